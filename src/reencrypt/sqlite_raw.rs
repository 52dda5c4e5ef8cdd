//! A minimal safe wrapper over the SQLite C library (the same bundled
//! library sqlx links) for the engine's hot path on SQLite.
//!
//! Why not sqlx here: sqlx-sqlite runs each connection on a worker thread
//! and exchanges messages with it per statement and per row, converts rows
//! through the `Any` driver, and looks every bound parameter up by name.
//! Profiled at 1,000-row batches, that machinery (thread hand-offs, copies,
//! allocation, `sqlite3_bind_parameter_name`) cost more than SQLite's own
//! work. Here the engine's blocking thread steps prepared statements
//! directly, as Python's `sqlite3.executemany` does: one prepared
//! compare-and-set UPDATE, reset and re-bound per row, inside one
//! transaction per batch.
//!
//! Everything else in keywarden keeps using sqlx; these connections live
//! only for one pass of the engine.

use std::ffi::{CStr, CString, c_int};
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::{self, NonNull};

use anyhow::{Context, bail};
use libsqlite3_sys as ffi;

/// One SQLite connection, used by one thread at a time.
pub struct Conn {
    db: NonNull<ffi::sqlite3>,
}

// SAFETY: the bundled SQLite is compiled thread-safe (SQLITE_THREADSAFE=1)
// and the connection is opened in multi-thread mode (NOMUTEX), where a
// connection may move between threads as long as no two use it at once.
// `Conn` is not `Sync`, so only its one owner can use it.
unsafe impl Send for Conn {}

impl Conn {
    /// Opens an existing database file read-write (never creates one) and
    /// sets a busy timeout so writes queue behind other writers.
    pub fn open(path: &Path, busy_timeout_ms: i32) -> anyhow::Result<Conn> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .with_context(|| format!("the database path {} contains a NUL", path.display()))?;
        let mut db: *mut ffi::sqlite3 = ptr::null_mut();
        // SAFETY: valid NUL-terminated path and out-pointer; flags are valid.
        let rc = unsafe {
            ffi::sqlite3_open_v2(
                c_path.as_ptr(),
                &mut db,
                ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_NOMUTEX,
                ptr::null(),
            )
        };
        // sqlite3_open_v2 returns a handle even on most failures; it must be
        // closed either way.
        let Some(db) = NonNull::new(db) else {
            bail!(
                "cannot open the SQLite database {}: out of memory",
                path.display()
            );
        };
        let conn = Conn { db };
        if rc != ffi::SQLITE_OK {
            return Err(conn.error(rc))
                .with_context(|| format!("cannot open the SQLite database {}", path.display()));
        }
        // SAFETY: the handle is open.
        unsafe { ffi::sqlite3_busy_timeout(conn.db.as_ptr(), busy_timeout_ms) };
        Ok(conn)
    }

    /// Runs SQL that returns no rows (one or more statements).
    pub fn exec(&self, sql: &str) -> anyhow::Result<()> {
        let c_sql = CString::new(sql).context("SQL contains a NUL")?;
        // SAFETY: open handle, NUL-terminated SQL, no callback.
        let rc = unsafe {
            ffi::sqlite3_exec(
                self.db.as_ptr(),
                c_sql.as_ptr(),
                None,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error(rc));
        }
        Ok(())
    }

    /// Prepares one statement.
    pub fn prepare(&self, sql: &str) -> anyhow::Result<Stmt<'_>> {
        let mut stmt: *mut ffi::sqlite3_stmt = ptr::null_mut();
        let len = c_int::try_from(sql.len()).context("SQL too long")?;
        // SAFETY: open handle; `sql` is valid for `len` bytes (no NUL needed
        // when the length is given); out-pointer valid.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                self.db.as_ptr(),
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error(rc));
        }
        let stmt = NonNull::new(stmt).context("empty SQL statement")?;
        Ok(Stmt {
            stmt,
            db: self.db,
            _conn: PhantomData,
        })
    }

    /// Rows changed by the last INSERT, UPDATE or DELETE.
    pub fn changes(&self) -> u64 {
        // SAFETY: open handle.
        let n = unsafe { ffi::sqlite3_changes64(self.db.as_ptr()) };
        n.max(0) as u64
    }

    /// Whether a transaction is open (not in autocommit mode).
    pub fn in_transaction(&self) -> bool {
        // SAFETY: open handle.
        unsafe { ffi::sqlite3_get_autocommit(self.db.as_ptr()) == 0 }
    }

    fn error(&self, rc: c_int) -> anyhow::Error {
        error_of(self.db, rc)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: every `Stmt` borrows the connection, so all are finalized
        // by now.
        unsafe { ffi::sqlite3_close(self.db.as_ptr()) };
    }
}

fn error_of(db: NonNull<ffi::sqlite3>, rc: c_int) -> anyhow::Error {
    // SAFETY: open handle; errmsg returns a NUL-terminated string owned by
    // SQLite, valid until the next call on this connection (copied at once).
    let msg = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr())) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: errstr returns a static string for any code.
    let code = unsafe { CStr::from_ptr(ffi::sqlite3_errstr(rc)) }.to_string_lossy();
    anyhow::anyhow!("SQLite error {rc} ({code}): {msg}")
}

/// A prepared statement of `Conn`. Parameters are numbered from 1 and
/// columns from 0, as in the C API.
pub struct Stmt<'c> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: NonNull<ffi::sqlite3>,
    _conn: PhantomData<&'c Conn>,
}

impl<'c> Stmt<'c> {
    fn check(&self, rc: c_int) -> anyhow::Result<()> {
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(error_of(self.db, rc))
        }
    }

    pub fn bind_i64(&mut self, i: c_int, v: i64) -> anyhow::Result<()> {
        // SAFETY: live statement; a bad index is reported as SQLITE_RANGE.
        let rc = unsafe { ffi::sqlite3_bind_int64(self.stmt.as_ptr(), i, v) };
        self.check(rc)
    }

    /// Binds text; SQLite copies it (SQLITE_TRANSIENT), so `v` need not
    /// outlive the call.
    pub fn bind_text(&mut self, i: c_int, v: &str) -> anyhow::Result<()> {
        // SAFETY: SQLITE_TRANSIENT makes SQLite copy `v` before returning.
        unsafe { self.bind_text_with(i, v, ffi::SQLITE_TRANSIENT()) }
    }

    /// Binds text without copying it (SQLITE_STATIC): SQLite reads `v`
    /// whenever the statement steps until the parameter is bound again or
    /// the statement is finalized, so `v` must outlive the statement, which
    /// `'c` (the statement's own lifetime) enforces. Saves a copy per row
    /// on the engine's write path.
    pub fn bind_text_borrowed(&mut self, i: c_int, v: &'c str) -> anyhow::Result<()> {
        // SAFETY: `v` is valid for `'c`, which outlasts every use of this
        // statement, its finalization included.
        unsafe { self.bind_text_with(i, v, ffi::SQLITE_STATIC()) }
    }

    /// # Safety
    /// With `SQLITE_STATIC`, `v` must stay valid while SQLite may read it:
    /// until the parameter is bound again or the statement is finalized.
    unsafe fn bind_text_with(
        &mut self,
        i: c_int,
        v: &str,
        destructor: ffi::sqlite3_destructor_type,
    ) -> anyhow::Result<()> {
        let len = c_int::try_from(v.len()).context("value too long for SQLite")?;
        // SAFETY: live statement; `v` is valid for `len` bytes now, and for
        // as long as SQLite keeps the pointer by the caller's contract.
        let rc = unsafe {
            ffi::sqlite3_bind_text(self.stmt.as_ptr(), i, v.as_ptr().cast(), len, destructor)
        };
        self.check(rc)
    }

    /// Steps once: `true` when a row is ready, `false` when done.
    pub fn step(&mut self) -> anyhow::Result<bool> {
        // SAFETY: live statement.
        match unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) } {
            ffi::SQLITE_ROW => Ok(true),
            ffi::SQLITE_DONE => Ok(false),
            rc => Err(error_of(self.db, rc)),
        }
    }

    /// Makes the statement ready to run again (bindings stay).
    pub fn reset(&mut self) {
        // SAFETY: live statement. The error of a failed step was already
        // returned by `step`; reset repeats it, so it is ignored here.
        unsafe { ffi::sqlite3_reset(self.stmt.as_ptr()) };
    }

    /// The type of column `i` of the current row.
    pub fn column_kind(&self, i: c_int) -> Kind {
        // SAFETY: live statement positioned on a row; out-of-range columns
        // read as NULL.
        match unsafe { ffi::sqlite3_column_type(self.stmt.as_ptr(), i) } {
            ffi::SQLITE_INTEGER => Kind::Integer,
            ffi::SQLITE_NULL => Kind::Null,
            ffi::SQLITE_TEXT => Kind::Text,
            _ => Kind::Other,
        }
    }

    pub fn column_i64(&self, i: c_int) -> i64 {
        // SAFETY: as `column_kind`.
        unsafe { ffi::sqlite3_column_int64(self.stmt.as_ptr(), i) }
    }

    /// Column `i` as text (`None` for NULL), copied out.
    pub fn column_text(&self, i: c_int) -> anyhow::Result<Option<String>> {
        // SAFETY: as `column_kind`. column_text must come before
        // column_bytes (the documented order); the pointer stays valid
        // until the next step/reset, and the bytes are copied at once.
        unsafe {
            let p = ffi::sqlite3_column_text(self.stmt.as_ptr(), i);
            if p.is_null() {
                return Ok(None);
            }
            let n = ffi::sqlite3_column_bytes(self.stmt.as_ptr(), i).max(0) as usize;
            let bytes = std::slice::from_raw_parts(p, n);
            Ok(Some(
                std::str::from_utf8(bytes)
                    .context("a text column is not UTF-8")?
                    .to_owned(),
            ))
        }
    }
}

impl Drop for Stmt<'_> {
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized once.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

/// SQLite's storage class of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Integer,
    Text,
    Null,
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_statements_bind_step_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        std::fs::File::create(&path).unwrap();
        let c = Conn::open(&path, 1000).unwrap();
        c.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        c.exec("BEGIN IMMEDIATE").unwrap();
        assert!(c.in_transaction());
        {
            let mut ins = c.prepare("INSERT INTO t (id, v) VALUES (?1, ?2)").unwrap();
            for i in 0..3 {
                ins.reset();
                ins.bind_i64(1, i).unwrap();
                ins.bind_text(2, &format!("v{i}")).unwrap();
                assert!(!ins.step().unwrap());
                assert_eq!(c.changes(), 1);
            }
        }
        c.exec("COMMIT").unwrap();
        let mut q = c.prepare("SELECT id, v, NULL FROM t ORDER BY id").unwrap();
        let mut got = Vec::new();
        while q.step().unwrap() {
            assert_eq!(q.column_kind(0), Kind::Integer);
            assert_eq!(q.column_kind(2), Kind::Null);
            got.push((q.column_i64(0), q.column_text(1).unwrap().unwrap()));
        }
        assert_eq!(
            got,
            vec![(0, "v0".into()), (1, "v1".into()), (2, "v2".into())]
        );
        let err = c.prepare("SELECT nope FROM t").err().unwrap();
        assert!(format!("{err}").contains("no such column"), "{err}");
        assert!(Conn::open(&dir.path().join("missing.db"), 10).is_err());
    }
}
