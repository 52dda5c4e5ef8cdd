//! Job definitions as data: the typed form of `jobs/*.toml`.
//!
//! An operator changes *when* a job looks for work by editing a TOML file, not by
//! recompiling; *what* is due comes from the keyring policy in the config. This
//! module turns those files into validated [`JobDef`] values before anything runs
//! ("parse, don't validate"), so a typo in a job kind, an option or a cron
//! expression stops the worker at start with a message naming the file, the field
//! and what is allowed, instead of surfacing at 03:00 when the job first fires.
//!
//! It also owns [`Schedule`], the cron expression both the worker (through
//! tokio-cron-scheduler) and the pure catch-up logic (`run --once`, missed ticks)
//! agree on. Apart from [`load_dir`], which reads the job directory, everything
//! here is pure: time is always an argument.

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Timelike, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// The purpose of a key, as a rotation job names it in `options.purposes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyPurpose {
    /// JWT signing keys (`[policy.signing]`).
    Signing,
    /// The A256GCM key for JWE tokens (`[policy.token_encryption]`).
    TokenEncryption,
    /// Fernet data keys that encrypt stored secrets (`[policy.data]`).
    Data,
    /// HMAC temp keys (`[policy.temp]`).
    Temp,
}

impl KeyPurpose {
    /// Every purpose, in the order error messages list them.
    pub const ALL: [KeyPurpose; 4] = [
        KeyPurpose::Signing,
        KeyPurpose::TokenEncryption,
        KeyPurpose::Data,
        KeyPurpose::Temp,
    ];

    /// The spelling used in job files, the config and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPurpose::Signing => "signing",
            KeyPurpose::TokenEncryption => "token_encryption",
            KeyPurpose::Data => "data",
            KeyPurpose::Temp => "temp",
        }
    }

    /// Parses the spelling used in job files; `None` for anything else.
    pub fn from_name(name: &str) -> Option<KeyPurpose> {
        KeyPurpose::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job runs, with the options that kind takes already typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// `rotate`: rotates the keys of these purposes that the policy says are due.
    Rotate {
        /// Never empty and never holds a purpose twice.
        purposes: Vec<KeyPurpose>,
    },
    /// `expire-keys`: retires signing keys past grace, destroys expired temp keys,
    /// expires API keys.
    ExpireKeys,
    /// `reencrypt-secrets`: moves rows still under a non-active data key to the
    /// active one.
    ReencryptSecrets {
        /// The name of one `[[reencrypt.targets]]` entry to limit the job to;
        /// `None` means keywarden's own secrets and every configured target.
        target: Option<String>,
        /// Rows per batch; `None` means the re-encryption default.
        batch_size: Option<NonZeroU32>,
    },
    /// `check-alerts`: evaluates the alert rules.
    CheckAlerts,
    /// `audit-checkpoint`: verifies the audit chain and writes a checkpoint.
    AuditCheckpoint,
}

impl JobKind {
    /// Every kind name accepted in `kind = "..."`, in the order error messages list them.
    pub const NAMES: [&'static str; 5] = [
        "rotate",
        "expire-keys",
        "reencrypt-secrets",
        "check-alerts",
        "audit-checkpoint",
    ];

    /// The kind's name as written in a job file.
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Rotate { .. } => "rotate",
            JobKind::ExpireKeys => "expire-keys",
            JobKind::ReencryptSecrets { .. } => "reencrypt-secrets",
            JobKind::CheckAlerts => "check-alerts",
            JobKind::AuditCheckpoint => "audit-checkpoint",
        }
    }

    /// The option names a kind accepts under `[options]`.
    pub fn allowed_options(kind_name: &str) -> &'static [&'static str] {
        match kind_name {
            "rotate" => &["purposes"],
            "reencrypt-secrets" => &["target", "batch_size"],
            _ => &[],
        }
    }
}

/// One validated job definition, from a `jobs/<name>.toml` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDef {
    /// The job's name; always equal to the file's stem.
    pub name: String,
    /// What the job runs, with its options.
    pub kind: JobKind,
    /// When the job looks for work (UTC).
    pub schedule: Schedule,
    /// A disabled job is loaded and validated but not scheduled.
    pub enabled: bool,
    /// Free text for `job list`; empty when the file has none.
    pub description: String,
    /// The file the definition came from (`jobs/<name>.toml` for the built-in ones).
    pub file: PathBuf,
}

/// Why a job definition (or a set of them) was rejected.
///
/// Every message starts with the file and, where one is at fault, the field
/// (dotted, with list positions: `options.purposes[0]`), and says what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum JobDefError {
    /// The job directory could not be listed.
    #[error("{}: cannot read the job definitions directory: {source}", dir.display())]
    ReadDir {
        /// The directory given to [`load_dir`].
        dir: PathBuf,
        /// The underlying IO error.
        source: std::io::Error,
    },
    /// A job file could not be read (missing permission, not UTF-8, ...).
    #[error("{}: cannot read: {source}", file.display())]
    ReadFile {
        /// The file.
        file: PathBuf,
        /// The underlying IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: not valid TOML: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The TOML parser's description, with line and column.
        message: String,
    },
    /// A field (or option) that this kind of file does not have.
    #[error("{}: {field}: unknown {what} (allowed: {allowed})", file.display())]
    UnknownField {
        /// The file.
        file: PathBuf,
        /// The offending field, dotted (`options.bogus`).
        field: String,
        /// `field`, or `option for kind "..."`.
        what: String,
        /// The names that are allowed at that place, comma-separated, or `none`.
        allowed: String,
    },
    /// A required field is absent.
    #[error("{}: {field}: required field is missing (expected {expected})", file.display())]
    MissingField {
        /// The file.
        file: PathBuf,
        /// The missing field, dotted.
        field: String,
        /// What the field should hold.
        expected: String,
    },
    /// A field holds a value of the wrong TOML type.
    #[error("{}: {field}: expected {expected}, found {found}", file.display())]
    WrongType {
        /// The file.
        file: PathBuf,
        /// The field, dotted.
        field: String,
        /// What the field should hold.
        expected: String,
        /// The TOML type found (`string`, `integer`, `array`, ...).
        found: String,
    },
    /// A field has the right type but a value that is not allowed.
    #[error("{}: {field}: {message}", file.display())]
    InvalidValue {
        /// The file.
        file: PathBuf,
        /// The field, dotted.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// Two definitions carry the same job name.
    #[error("{}: name: job \"{name}\" is already defined in {}", file.display(), first.display())]
    Duplicate {
        /// The job name defined twice.
        name: String,
        /// The file seen second.
        file: PathBuf,
        /// The file seen first.
        first: PathBuf,
    },
}

/// A validated cron schedule in UTC, normalized to 6 fields
/// `sec min hour day-of-month month day-of-week`.
///
/// # Format
///
/// The 6-field form is what tokio-cron-scheduler 0.15 takes. It parses with
/// croner 3.0.1 configured as `Seconds::Required` and `dom_and_dow(true)`
/// (`Job::new`, `Job::new_async` and their `_tz` variants), which rejects a
/// 5-field line. Here a standard 5-field Unix cron line is accepted too and
/// means the same as in crontab: it is normalized by prepending `0 ` (it fires
/// at second 0), which is unambiguous because a 5-field and a 6-field line can
/// always be told apart by their field count. The optional 7th (year) field
/// croner knows is not accepted.
///
/// Fields take numbers, `*`, lists `a,b`, ranges `a-b` and steps `*/n`, `a-b/n`;
/// months also `JAN`-`DEC`; day-of-week `0`-`7` (0 and 7 are Sunday), `SUN`-`SAT`,
/// `L` (last in month) and `#n` (n-th in month); day-of-month `L` and `W`.
///
/// A schedule that restricts *both* day-of-month and day-of-week is rejected:
/// Unix cron fires when *either* matches while tokio-cron-scheduler's `Job::new`
/// fires only when *both* do (and its `JobBuilder` when either does), so the
/// same line would mean different things. With at most one of them restricted
/// every dialect agrees, and so do [`Schedule::next_after`] and the worker.
///
/// A schedule that never fires (`0 0 0 31 2 *`) is rejected: the check looks
/// for a matching day within one whole 400-year Gregorian cycle, after which
/// the calendar repeats, so it is exact rather than a guess.
#[derive(Clone)]
pub struct Schedule {
    expr_6field: String,
    cron: Cron,
}

/// The 6 fields in order, with what each allows, for error messages.
const FIELDS: [(&str, &str); 6] = [
    ("seconds", "0-59"),
    ("minutes", "0-59"),
    ("hours", "0-23"),
    ("day-of-month", "1-31, L, nW"),
    ("month", "1-12 or JAN-DEC"),
    (
        "day-of-week",
        "0-7 or SUN-SAT (0 and 7 are Sunday), nL, n#k",
    ),
];

/// The never-fires check searches from here for one Gregorian cycle (400 years,
/// exactly 20871 weeks), so its answer is the same for every reference time.
const CYCLE_START_YEAR: i32 = 2000;
const CYCLE_YEARS: i32 = 400;

fn cron_parser() -> CronParser {
    // These are the options tokio-cron-scheduler 0.15.1 passes in `Job::new_tz`
    // and `Job::new_async_tz`, so the worker and this module compute the same
    // ticks from the same string.
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
}

/// Croner treats `?` as `*` in the day fields and only a field that is then
/// exactly `*` as unrestricted; this mirrors that rule.
fn is_unrestricted_day_field(field: &str) -> bool {
    field.replace('?', "*") == "*"
}

/// Drops the sub-second part: cron ticks fall on whole seconds.
fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0).unwrap_or(t)
}

impl Schedule {
    /// Parses and validates a 6-field (or 5-field Unix) cron expression.
    ///
    /// The error names the field at fault and what it allows, or says that the
    /// schedule never fires.
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let given: Vec<&str> = s.split_whitespace().collect();
        let fields: Vec<&str> = match given.len() {
            6 => given,
            5 => std::iter::once("0").chain(given).collect(),
            n => {
                return Err(format!(
                    "\"{}\" has {n} field{}; expected 6 fields sec min hour dom month dow, \
                     or 5-field Unix cron min hour dom month dow",
                    s.trim(),
                    if n == 1 { "" } else { "s" }
                ));
            }
        };

        // Croner silently skips empty list elements, so `,` would parse as an empty
        // set that never matches; reject it here with a clear message instead.
        for (field, (field_name, allowed)) in fields.iter().zip(FIELDS) {
            if field.split(',').any(str::is_empty) {
                return Err(format!(
                    "{field_name} field \"{field}\" has an empty list element (allowed: {allowed})"
                ));
            }
        }

        if !is_unrestricted_day_field(fields[3]) && !is_unrestricted_day_field(fields[5]) {
            return Err(format!(
                "day-of-month \"{}\" and day-of-week \"{}\" are both restricted; cron dialects \
                 disagree on whether that means either or both, so set one of them to *",
                fields[3], fields[5]
            ));
        }

        let parser = cron_parser();
        let expr_6field = fields.join(" ");
        let cron = match parser.parse(&expr_6field) {
            Ok(cron) => cron,
            Err(whole) => return Err(locate_field_error(&parser, &fields, &whole)),
        };

        // The time-of-day fields always match at least one value once parsed (no
        // empty lists, no inverted ranges), so whether the schedule ever fires
        // depends only on the day fields. Probe them at midnight with a year
        // field bounding croner's search to one cycle; unbounded, it would scan
        // to year 5000 before giving up.
        let probe = format!(
            "0 0 0 {} {} {} {}-{}",
            fields[3],
            fields[4],
            fields[5],
            CYCLE_START_YEAR,
            CYCLE_START_YEAR + CYCLE_YEARS - 1
        );
        let start = Utc
            .with_ymd_and_hms(CYCLE_START_YEAR, 1, 1, 0, 0, 0)
            .single()
            .expect("the cycle start is a valid UTC time");
        let fires = parser
            .parse(&probe)
            .ok()
            .and_then(|p| p.find_next_occurrence(&start, true).ok())
            .is_some();
        if !fires {
            return Err(format!(
                "\"{expr_6field}\" never fires: no date matches day-of-month \"{}\", month \"{}\" \
                 and day-of-week \"{}\" in a whole 400-year calendar cycle",
                fields[3], fields[4], fields[5]
            ));
        }

        Ok(Schedule { expr_6field, cron })
    }

    /// The normalized 6-field expression, ready for tokio-cron-scheduler's
    /// `Job::new_async`.
    pub fn as_str(&self) -> &str {
        &self.expr_6field
    }

    /// The first tick strictly after `t`; `None` only past croner's year 5000 limit.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // A tick at the whole second of `t` is not after a `t` with a fraction,
        // and every later tick is, so searching from the whole second is exact.
        self.cron.find_next_occurrence(&whole_second(t), false).ok()
    }

    /// The latest tick at or before `now`, for catch-up and `run --once`; `None`
    /// only before year 1.
    ///
    /// Croner searches backwards field by field (year, month, day, hour, ...),
    /// so this costs the same for an every-second and a yearly schedule.
    pub fn latest_tick_at_or_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&whole_second(now), true)
            .ok()
    }

    /// The ticks `t` with `from < t <= to`, earliest first, at most `cap` of them.
    ///
    /// The cap keeps an every-second schedule over a long outage from building a
    /// huge list; a caller that only needs the newest tick wants
    /// [`Schedule::latest_tick_at_or_before`] instead.
    pub fn ticks_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        cap: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut ticks = Vec::new();
        let mut cursor = from;
        while ticks.len() < cap {
            match self.next_after(cursor) {
                Some(tick) if tick <= to => {
                    ticks.push(tick);
                    cursor = tick;
                }
                _ => break,
            }
        }
        ticks
    }
}

/// Re-parses each field alone (the others `*`) to find which one croner
/// rejected, since croner's own messages do not say.
fn locate_field_error(
    parser: &CronParser,
    fields: &[&str],
    whole: &croner::errors::CronError,
) -> String {
    for (i, (field_name, allowed)) in FIELDS.iter().enumerate() {
        let mut probe = ["*"; 6];
        probe[i] = fields[i];
        if let Err(e) = parser.parse(&probe.join(" ")) {
            return format!(
                "{field_name} field \"{}\" is invalid: {} (allowed: {allowed}, with * , - /)",
                fields[i],
                describe_cron_error(&e)
            );
        }
    }
    format!(
        "\"{}\" is invalid: {}",
        fields.join(" "),
        describe_cron_error(whole)
    )
}

/// Croner's messages carry prefixes such as "Component error: "; keep the cause.
fn describe_cron_error(e: &croner::errors::CronError) -> String {
    use croner::errors::CronError;
    let text = match e {
        CronError::ComponentError(m)
        | CronError::InvalidPattern(m)
        | CronError::IllegalCharacters(m) => m.clone(),
        other => other.to_string(),
    };
    let text = text.trim_end_matches('.');
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expr_6field)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Croner's parsed form is a set of bit fields; the expression says it all.
        f.debug_tuple("Schedule").field(&self.expr_6field).finish()
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Schedule) -> bool {
        self.expr_6field == other.expr_6field
    }
}

impl Eq for Schedule {}

/// The top-level fields of a job file, in the order error messages list them.
const TOP_LEVEL_FIELDS: [&str; 6] = [
    "name",
    "kind",
    "schedule",
    "enabled",
    "description",
    "options",
];

/// The default job files, embedded so a binary without the `jobs/` directory
/// still has its jobs: `(file name, text)`, sorted by file name.
pub const BUILTIN_JOB_FILES: [(&str, &str); 7] = [
    (
        "audit-checkpoint.toml",
        include_str!("../../jobs/audit-checkpoint.toml"),
    ),
    (
        "check-alerts.toml",
        include_str!("../../jobs/check-alerts.toml"),
    ),
    (
        "expire-keys.toml",
        include_str!("../../jobs/expire-keys.toml"),
    ),
    (
        "reencrypt-secrets.toml",
        include_str!("../../jobs/reencrypt-secrets.toml"),
    ),
    (
        "rotate-data-keys.toml",
        include_str!("../../jobs/rotate-data-keys.toml"),
    ),
    (
        "rotate-signing-keys.toml",
        include_str!("../../jobs/rotate-signing-keys.toml"),
    ),
    (
        "rotate-temp-keys.toml",
        include_str!("../../jobs/rotate-temp-keys.toml"),
    ),
];

/// The built-in job definitions, parsed from the embedded copies of `jobs/*.toml`;
/// each carries `file = jobs/<name>.toml`.
///
/// # Panics
///
/// Never in a tested build: the unit tests parse every embedded file.
pub fn builtin_defaults() -> Vec<JobDef> {
    BUILTIN_JOB_FILES
        .iter()
        .map(|(file_name, text)| {
            parse_job(&format!("jobs/{file_name}"), text)
                .unwrap_or_else(|e| panic!("embedded job definition is invalid: {e}"))
        })
        .collect()
}

/// Reads and validates every `*.toml` file in `dir`, sorted by file name.
///
/// Files whose names start with `.` (editor swap and lock files) are skipped.
/// An empty directory gives an empty list; the caller decides whether that is
/// an error.
pub fn load_dir(dir: &Path) -> Result<Vec<JobDef>, JobDefError> {
    let read_dir_error = |source| JobDefError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        let is_toml = path.extension().is_some_and(|ext| ext == "toml");
        let is_hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        // `is_file` follows symlinks, so a linked job file counts.
        if is_toml && !is_hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();

    let mut defs = Vec::with_capacity(files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| JobDefError::ReadFile {
            file: path.clone(),
            source,
        })?;
        defs.push(parse_job(&path.to_string_lossy(), &text)?);
    }
    check_unique(&defs)?;
    Ok(defs)
}

/// Rejects a set of definitions in which two carry the same name (for example
/// the built-in defaults merged with files from another directory).
pub fn check_unique(defs: &[JobDef]) -> Result<(), JobDefError> {
    let mut seen: std::collections::HashMap<&str, &Path> = std::collections::HashMap::new();
    for def in defs {
        if let Some(first) = seen.insert(&def.name, &def.file) {
            return Err(JobDefError::Duplicate {
                name: def.name.clone(),
                file: def.file.clone(),
                first: first.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Parses and validates one job file's text. `file_name` is used for messages,
/// for [`JobDef::file`] and for the name check: `name` must equal its stem.
pub fn parse_job(file_name: &str, text: &str) -> Result<JobDef, JobDefError> {
    let file = PathBuf::from(file_name);
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| JobDefError::Syntax {
            file: file.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
    let ctx = Ctx { file: &file };

    ctx.reject_unknown(&table, "", "field", &TOP_LEVEL_FIELDS)?;

    let name = ctx.required_str(
        &table,
        "name",
        "the job name, equal to the file name without .toml",
    )?;
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != stem {
        return Err(ctx.invalid(
            "name",
            format!("\"{name}\" does not match the file name (expected \"{stem}\", the file's name without .toml)"),
        ));
    }
    if !is_valid_job_name(name) {
        return Err(ctx.invalid(
            "name",
            format!("\"{name}\" is not a job name (allowed: lowercase letters, digits and '-', starting with a letter or digit)"),
        ));
    }

    let kinds = JobKind::NAMES.join(", ");
    let kind_name = ctx.required_str(&table, "kind", &format!("one of: {kinds}"))?;
    if !JobKind::NAMES.contains(&kind_name) {
        return Err(ctx.invalid(
            "kind",
            format!("\"{kind_name}\" is not a job kind (allowed: {kinds})"),
        ));
    }

    let schedule_text = ctx.required_str(
        &table,
        "schedule",
        "a cron string: 6 fields sec min hour dom month dow, or 5-field Unix cron",
    )?;
    let schedule = Schedule::parse(schedule_text).map_err(|m| ctx.invalid("schedule", m))?;

    let enabled = match table.get("enabled") {
        None => true,
        Some(toml::Value::Boolean(b)) => *b,
        Some(other) => return Err(ctx.wrong_type("enabled", "a boolean (true or false)", other)),
    };
    let description = match table.get("description") {
        None => String::new(),
        Some(toml::Value::String(s)) => s.clone(),
        Some(other) => return Err(ctx.wrong_type("description", "a string", other)),
    };

    let empty = toml::Table::new();
    let options = match table.get("options") {
        None => &empty,
        Some(toml::Value::Table(t)) => t,
        Some(other) => return Err(ctx.wrong_type("options", "a table ([options])", other)),
    };
    let allowed = JobKind::allowed_options(kind_name);
    ctx.reject_unknown(
        options,
        "options.",
        &format!("option for kind \"{kind_name}\""),
        allowed,
    )?;
    let kind = ctx.parse_kind(kind_name, options)?;

    Ok(JobDef {
        name: name.to_string(),
        kind,
        schedule,
        enabled,
        description,
        file,
    })
}

/// Job names appear on the command line and in `job_runs`, so they stay plain.
fn is_valid_job_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The file being parsed, so every error names it.
struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn invalid(&self, field: &str, message: String) -> JobDefError {
        JobDefError::InvalidValue {
            file: self.file.to_path_buf(),
            field: field.to_string(),
            message,
        }
    }

    fn wrong_type(&self, field: &str, expected: &str, found: &toml::Value) -> JobDefError {
        JobDefError::WrongType {
            file: self.file.to_path_buf(),
            field: field.to_string(),
            expected: expected.to_string(),
            found: found.type_str().to_string(),
        }
    }

    fn missing(&self, field: &str, expected: &str) -> JobDefError {
        JobDefError::MissingField {
            file: self.file.to_path_buf(),
            field: field.to_string(),
            expected: expected.to_string(),
        }
    }

    fn reject_unknown(
        &self,
        table: &toml::Table,
        prefix: &str,
        what: &str,
        allowed: &[&str],
    ) -> Result<(), JobDefError> {
        // Sorted so that a file with several unknown fields always reports the same one.
        let mut keys: Vec<&String> = table.keys().collect();
        keys.sort();
        match keys.into_iter().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(key) => Err(JobDefError::UnknownField {
                file: self.file.to_path_buf(),
                field: format!("{prefix}{key}"),
                what: what.to_string(),
                allowed: if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                },
            }),
        }
    }

    fn required_str<'t>(
        &self,
        table: &'t toml::Table,
        field: &str,
        expected: &str,
    ) -> Result<&'t str, JobDefError> {
        match table.get(field) {
            None => Err(self.missing(field, expected)),
            Some(toml::Value::String(s)) => Ok(s),
            Some(other) => Err(self.wrong_type(field, &format!("a string: {expected}"), other)),
        }
    }

    fn parse_kind(&self, kind_name: &str, options: &toml::Table) -> Result<JobKind, JobDefError> {
        Ok(match kind_name {
            "rotate" => JobKind::Rotate {
                purposes: self.parse_purposes(options)?,
            },
            "expire-keys" => JobKind::ExpireKeys,
            "reencrypt-secrets" => {
                let target = match options.get("target") {
                    None => None,
                    Some(toml::Value::String(s)) if s.trim().is_empty() => {
                        return Err(self.invalid(
                            "options.target",
                            "is empty (allowed: the name of a [[reencrypt.targets]] entry; leave the option out for all targets)".to_string(),
                        ));
                    }
                    Some(toml::Value::String(s)) => Some(s.clone()),
                    Some(other) => {
                        return Err(self.wrong_type(
                            "options.target",
                            "a string naming a [[reencrypt.targets]] entry",
                            other,
                        ));
                    }
                };
                let batch_size = match options.get("batch_size") {
                    None => None,
                    Some(toml::Value::Integer(n)) => Some(
                        u32::try_from(*n)
                            .ok()
                            .and_then(NonZeroU32::new)
                            .ok_or_else(|| {
                                self.invalid(
                                    "options.batch_size",
                                    format!("{n} is not a batch size (allowed: 1 to {})", u32::MAX),
                                )
                            })?,
                    ),
                    Some(other) => {
                        return Err(self.wrong_type(
                            "options.batch_size",
                            "a positive integer",
                            other,
                        ));
                    }
                };
                JobKind::ReencryptSecrets { target, batch_size }
            }
            "check-alerts" => JobKind::CheckAlerts,
            "audit-checkpoint" => JobKind::AuditCheckpoint,
            // `parse_job` checked the name against `JobKind::NAMES` already.
            other => {
                return Err(self.invalid("kind", format!("\"{other}\" is not a job kind")));
            }
        })
    }

    fn parse_purposes(&self, options: &toml::Table) -> Result<Vec<KeyPurpose>, JobDefError> {
        let allowed = KeyPurpose::ALL.map(KeyPurpose::as_str).join(", ");
        let expected = format!("a non-empty list of key purposes from: {allowed}");
        let items = match options.get("purposes") {
            None => return Err(self.missing("options.purposes", &expected)),
            Some(toml::Value::Array(items)) => items,
            Some(other) => return Err(self.wrong_type("options.purposes", &expected, other)),
        };
        if items.is_empty() {
            return Err(self.invalid(
                "options.purposes",
                format!("is empty (expected {expected})"),
            ));
        }
        let mut purposes = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let field = format!("options.purposes[{i}]");
            let toml::Value::String(s) = item else {
                return Err(self.wrong_type(&field, &format!("a key purpose ({allowed})"), item));
            };
            let purpose = KeyPurpose::from_name(s).ok_or_else(|| {
                self.invalid(
                    &field,
                    format!("\"{s}\" is not a key purpose (allowed: {allowed})"),
                )
            })?;
            if purposes.contains(&purpose) {
                return Err(self.invalid(&field, format!("\"{s}\" is listed twice")));
            }
            purposes.push(purpose);
        }
        Ok(purposes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn schedule(s: &str) -> Schedule {
        Schedule::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn parse_err(file_name: &str, text: &str) -> JobDefError {
        match parse_job(file_name, text) {
            Ok(def) => panic!("{file_name} should be rejected, got {def:?}"),
            Err(e) => e,
        }
    }

    const VALID_ROTATE: &str = r#"
name = "rotate-data-keys"
kind = "rotate"
schedule = "0 0 3 * * *"
enabled = true
description = "d"
[options]
purposes = ["data"]
"#;

    /// The jobs/ directory of the crate, found from this file's path so the test
    /// works both in the crate and in a scratch crate that includes this file.
    fn jobs_dir() -> PathBuf {
        Path::new(file!())
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("defs.rs lives in src/scheduler/")
            .join("jobs")
    }

    #[test]
    fn every_builtin_job_file_parses_into_the_expected_kind() {
        let defs = builtin_defaults();
        let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "audit-checkpoint",
                "check-alerts",
                "expire-keys",
                "reencrypt-secrets",
                "rotate-data-keys",
                "rotate-signing-keys",
                "rotate-temp-keys",
            ]
        );
        let by_name = |n: &str| defs.iter().find(|d| d.name == n).unwrap();
        assert_eq!(
            by_name("rotate-signing-keys").kind,
            JobKind::Rotate {
                purposes: vec![KeyPurpose::Signing, KeyPurpose::TokenEncryption]
            }
        );
        assert_eq!(
            by_name("rotate-data-keys").kind,
            JobKind::Rotate {
                purposes: vec![KeyPurpose::Data]
            }
        );
        assert_eq!(
            by_name("rotate-temp-keys").kind,
            JobKind::Rotate {
                purposes: vec![KeyPurpose::Temp]
            }
        );
        assert_eq!(by_name("expire-keys").kind, JobKind::ExpireKeys);
        assert_eq!(
            by_name("reencrypt-secrets").kind,
            JobKind::ReencryptSecrets {
                target: None,
                batch_size: NonZeroU32::new(500)
            }
        );
        assert_eq!(by_name("check-alerts").kind, JobKind::CheckAlerts);
        assert_eq!(by_name("audit-checkpoint").kind, JobKind::AuditCheckpoint);
        for def in &defs {
            assert!(def.enabled, "{} should be enabled by default", def.name);
            assert!(
                !def.description.is_empty(),
                "{} needs a description",
                def.name
            );
            assert_eq!(def.file, PathBuf::from(format!("jobs/{}.toml", def.name)));
            assert_eq!(def.kind.name(), {
                let text = BUILTIN_JOB_FILES
                    .iter()
                    .find(|(f, _)| *f == format!("{}.toml", def.name))
                    .unwrap()
                    .1;
                text.parse::<toml::Table>().unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            });
        }
        check_unique(&defs).unwrap();
    }

    #[test]
    fn builtin_schedules_look_daily_hourly_or_more_often_as_documented() {
        let defs = builtin_defaults();
        let gap = |n: &str| {
            let s = &defs.iter().find(|d| d.name == n).unwrap().schedule;
            let first = s.next_after(utc(2025, 1, 1, 0, 0, 0)).unwrap();
            s.next_after(first).unwrap() - first
        };
        let day = chrono::Duration::days(1);
        let hour = chrono::Duration::hours(1);
        assert_eq!(gap("rotate-signing-keys"), day);
        assert_eq!(gap("rotate-data-keys"), day);
        assert_eq!(gap("audit-checkpoint"), day);
        assert_eq!(gap("rotate-temp-keys"), hour);
        assert_eq!(gap("expire-keys"), hour);
        assert_eq!(gap("reencrypt-secrets"), chrono::Duration::minutes(10));
        assert_eq!(gap("check-alerts"), chrono::Duration::minutes(1));
    }

    #[test]
    fn every_file_in_the_jobs_directory_is_embedded_and_identical() {
        let loaded = load_dir(&jobs_dir()).unwrap();
        let embedded = builtin_defaults();
        assert_eq!(
            loaded.len(),
            embedded.len(),
            "a jobs/*.toml file is not in BUILTIN_JOB_FILES"
        );
        for (from_disk, builtin) in loaded.iter().zip(&embedded) {
            assert_eq!(
                from_disk.file,
                jobs_dir().join(format!("{}.toml", builtin.name))
            );
            assert_eq!(
                JobDef {
                    file: builtin.file.clone(),
                    ..from_disk.clone()
                },
                *builtin
            );
        }
    }

    #[test]
    fn every_builtin_file_explains_that_the_schedule_says_when_to_look() {
        for (file, text) in BUILTIN_JOB_FILES {
            assert!(
                text.contains("when to LOOK"),
                "{file} lacks the schedule comment"
            );
            assert!(
                text.contains("5-field Unix cron"),
                "{file} lacks the format comment"
            );
        }
    }

    #[test]
    fn parses_a_complete_rotation_job() {
        let def = parse_job("jobs/rotate-data-keys.toml", VALID_ROTATE).unwrap();
        assert_eq!(def.name, "rotate-data-keys");
        assert_eq!(def.schedule.as_str(), "0 0 3 * * *");
        assert!(def.enabled);
        assert_eq!(def.description, "d");
        assert_eq!(def.file, PathBuf::from("jobs/rotate-data-keys.toml"));
    }

    #[test]
    fn enabled_defaults_to_true_and_description_to_empty() {
        let def = parse_job(
            "x/check-alerts.toml",
            "name = \"check-alerts\"\nkind = \"check-alerts\"\nschedule = \"* * * * *\"\n",
        )
        .unwrap();
        assert!(def.enabled);
        assert_eq!(def.description, "");
        assert_eq!(def.schedule.as_str(), "0 * * * * *");
    }

    #[test]
    fn a_disabled_job_still_parses_and_stays_disabled() {
        let text = VALID_ROTATE.replace("enabled = true", "enabled = false");
        assert!(!parse_job("rotate-data-keys.toml", &text).unwrap().enabled);
    }

    #[test]
    fn rejects_an_unknown_purpose_naming_file_field_and_allowed_values() {
        let text = VALID_ROTATE.replace("[\"data\"]", "[\"dta\"]");
        let e = parse_err("jobs/rotate-data-keys.toml", &text);
        assert!(
            matches!(e, JobDefError::InvalidValue { ref field, .. } if field == "options.purposes[0]")
        );
        assert_eq!(
            e.to_string(),
            "jobs/rotate-data-keys.toml: options.purposes[0]: \"dta\" is not a key purpose \
             (allowed: signing, token_encryption, data, temp)"
        );
    }

    #[test]
    fn rejects_an_unknown_purpose_at_its_position_in_the_list() {
        let text = VALID_ROTATE.replace("[\"data\"]", "[\"data\", \"signin\"]");
        let e = parse_err("jobs/rotate-data-keys.toml", &text);
        assert!(
            e.to_string().contains("options.purposes[1]: \"signin\""),
            "{e}"
        );
    }

    #[test]
    fn rejects_an_unknown_top_level_field() {
        let text = format!("schedul = \"x\"\n{VALID_ROTATE}");
        let e = parse_err("jobs/rotate-data-keys.toml", &text);
        assert!(matches!(e, JobDefError::UnknownField { ref field, .. } if field == "schedul"));
        assert_eq!(
            e.to_string(),
            "jobs/rotate-data-keys.toml: schedul: unknown field \
             (allowed: name, kind, schedule, enabled, description, options)"
        );
    }

    #[test]
    fn rejects_an_option_the_kind_does_not_take() {
        let text = VALID_ROTATE.replace("[options]", "[options]\nbatch_size = 10");
        let e = parse_err("jobs/rotate-data-keys.toml", &text);
        assert_eq!(
            e.to_string(),
            "jobs/rotate-data-keys.toml: options.batch_size: unknown option for kind \"rotate\" \
             (allowed: purposes)"
        );
    }

    #[test]
    fn rejects_any_option_for_a_kind_without_options() {
        let text = "name = \"expire-keys\"\nkind = \"expire-keys\"\nschedule = \"0 0 * * * *\"\n\
                    [options]\npurposes = [\"temp\"]\n";
        let e = parse_err("jobs/expire-keys.toml", text);
        assert_eq!(
            e.to_string(),
            "jobs/expire-keys.toml: options.purposes: unknown option for kind \"expire-keys\" \
             (allowed: none)"
        );
    }

    #[test]
    fn accepts_an_empty_options_table_for_a_kind_without_options() {
        let text = "name = \"expire-keys\"\nkind = \"expire-keys\"\nschedule = \"0 0 * * * *\"\n[options]\n";
        assert_eq!(
            parse_job("expire-keys.toml", text).unwrap().kind,
            JobKind::ExpireKeys
        );
    }

    #[test]
    fn rejects_each_missing_required_field() {
        for (field, line) in [
            ("name", "name = \"rotate-data-keys\"\n"),
            ("kind", "kind = \"rotate\"\n"),
            ("schedule", "schedule = \"0 0 3 * * *\"\n"),
        ] {
            let text = VALID_ROTATE.replace(line, "");
            let e = parse_err("jobs/rotate-data-keys.toml", &text);
            assert!(
                matches!(e, JobDefError::MissingField { field: ref f, .. } if f == field),
                "{field}: {e}"
            );
            assert!(
                e.to_string().starts_with(&format!(
                    "jobs/rotate-data-keys.toml: {field}: required field is missing"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_a_rotation_job_without_purposes() {
        let text = VALID_ROTATE.replace("purposes = [\"data\"]\n", "");
        let e = parse_err("jobs/rotate-data-keys.toml", &text);
        assert_eq!(
            e.to_string(),
            "jobs/rotate-data-keys.toml: options.purposes: required field is missing \
             (expected a non-empty list of key purposes from: signing, token_encryption, data, temp)"
        );
        let without_table = VALID_ROTATE.replace("[options]\npurposes = [\"data\"]\n", "");
        let e = parse_err("jobs/rotate-data-keys.toml", &without_table);
        assert!(
            matches!(e, JobDefError::MissingField { ref field, .. } if field == "options.purposes")
        );
    }

    #[test]
    fn rejects_an_empty_or_repeated_purpose_list() {
        let empty = VALID_ROTATE.replace("[\"data\"]", "[]");
        let e = parse_err("jobs/rotate-data-keys.toml", &empty);
        assert!(e.to_string().contains("options.purposes: is empty"), "{e}");
        let twice = VALID_ROTATE.replace("[\"data\"]", "[\"data\", \"data\"]");
        let e = parse_err("jobs/rotate-data-keys.toml", &twice);
        assert!(
            e.to_string()
                .contains("options.purposes[1]: \"data\" is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn rejects_values_of_the_wrong_type() {
        let cases = [
            ("enabled = true", "enabled = \"yes\"", "enabled", "string"),
            (
                "schedule = \"0 0 3 * * *\"",
                "schedule = 3",
                "schedule",
                "integer",
            ),
            (
                "name = \"rotate-data-keys\"",
                "name = [\"rotate-data-keys\"]",
                "name",
                "array",
            ),
            (
                "description = \"d\"",
                "description = 1.5",
                "description",
                "float",
            ),
            ("[\"data\"]", "\"data\"", "options.purposes", "string"),
            ("[\"data\"]", "[1]", "options.purposes[0]", "integer"),
        ];
        for (from, to, field, found) in cases {
            let text = VALID_ROTATE.replace(from, to);
            let e = parse_err("jobs/rotate-data-keys.toml", &text);
            assert!(
                matches!(e, JobDefError::WrongType { field: ref f, found: ref t, .. } if f == field && t == found),
                "{to}: {e}"
            );
        }
        let options_not_table = "name = \"check-alerts\"\nkind = \"check-alerts\"\n\
                                 schedule = \"* * * * *\"\noptions = 3\n";
        let e = parse_err("check-alerts.toml", options_not_table);
        assert_eq!(
            e.to_string(),
            "check-alerts.toml: options: expected a table ([options]), found integer"
        );
    }

    #[test]
    fn rejects_a_name_that_differs_from_the_file_stem() {
        let e = parse_err("jobs/rotate-temp-keys.toml", VALID_ROTATE);
        assert_eq!(
            e.to_string(),
            "jobs/rotate-temp-keys.toml: name: \"rotate-data-keys\" does not match the file name \
             (expected \"rotate-temp-keys\", the file's name without .toml)"
        );
    }

    #[test]
    fn rejects_a_name_with_characters_unfit_for_the_command_line() {
        let text = VALID_ROTATE.replace("\"rotate-data-keys\"", "\"Rotate Data\"");
        let e = parse_err("jobs/Rotate Data.toml", &text);
        assert!(e.to_string().contains("is not a job name"), "{e}");
    }

    #[test]
    fn rejects_an_unknown_kind_listing_the_allowed_kinds() {
        let text = VALID_ROTATE.replace("kind = \"rotate\"", "kind = \"rotation\"");
        let e = parse_err("jobs/rotate-data-keys.toml", &text);
        assert_eq!(
            e.to_string(),
            "jobs/rotate-data-keys.toml: kind: \"rotation\" is not a job kind \
             (allowed: rotate, expire-keys, reencrypt-secrets, check-alerts, audit-checkpoint)"
        );
    }

    #[test]
    fn rejects_a_bad_schedule_naming_the_schedule_field() {
        let text = VALID_ROTATE.replace("0 0 3 * * *", "0 3 * *");
        let e = parse_err("jobs/rotate-data-keys.toml", &text);
        assert_eq!(
            e.to_string(),
            "jobs/rotate-data-keys.toml: schedule: \"0 3 * *\" has 4 fields; expected 6 fields \
             sec min hour dom month dow, or 5-field Unix cron min hour dom month dow"
        );
    }

    #[test]
    fn rejects_invalid_toml_naming_the_file() {
        let e = parse_err("jobs/rotate-data-keys.toml", "name = \"unterminated\n");
        assert!(matches!(e, JobDefError::Syntax { .. }));
        assert!(
            e.to_string()
                .starts_with("jobs/rotate-data-keys.toml: not valid TOML:"),
            "{e}"
        );
    }

    #[test]
    fn parses_reencrypt_options_and_rejects_bad_ones() {
        let base = "name = \"reencrypt-secrets\"\nkind = \"reencrypt-secrets\"\n\
                    schedule = \"0 */10 * * * *\"\n[options]\n";
        let def = parse_job(
            "reencrypt-secrets.toml",
            &format!("{base}target = \"app_secrets\"\nbatch_size = 100\n"),
        )
        .unwrap();
        assert_eq!(
            def.kind,
            JobKind::ReencryptSecrets {
                target: Some("app_secrets".to_string()),
                batch_size: NonZeroU32::new(100)
            }
        );
        let def = parse_job("reencrypt-secrets.toml", base).unwrap();
        assert_eq!(
            def.kind,
            JobKind::ReencryptSecrets {
                target: None,
                batch_size: None
            }
        );

        for bad in [
            "batch_size = 0",
            "batch_size = -5",
            "batch_size = 4294967296",
        ] {
            let e = parse_err("reencrypt-secrets.toml", &format!("{base}{bad}\n"));
            assert!(
                matches!(e, JobDefError::InvalidValue { ref field, .. } if field == "options.batch_size"),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("allowed: 1 to 4294967295"), "{e}");
        }
        let e = parse_err(
            "reencrypt-secrets.toml",
            &format!("{base}batch_size = \"100\"\n"),
        );
        assert!(
            matches!(e, JobDefError::WrongType { ref field, .. } if field == "options.batch_size")
        );
        let e = parse_err("reencrypt-secrets.toml", &format!("{base}target = 7\n"));
        assert!(matches!(e, JobDefError::WrongType { ref field, .. } if field == "options.target"));
        let e = parse_err("reencrypt-secrets.toml", &format!("{base}target = \" \"\n"));
        assert!(
            matches!(e, JobDefError::InvalidValue { ref field, .. } if field == "options.target")
        );
    }

    #[test]
    fn check_unique_rejects_two_definitions_with_the_same_name() {
        let first = parse_job("a/rotate-data-keys.toml", VALID_ROTATE).unwrap();
        let second = parse_job("b/rotate-data-keys.toml", VALID_ROTATE).unwrap();
        let e = check_unique(&[first, second]).unwrap_err();
        assert!(matches!(e, JobDefError::Duplicate { ref name, .. } if name == "rotate-data-keys"));
        assert_eq!(
            e.to_string(),
            "b/rotate-data-keys.toml: name: job \"rotate-data-keys\" is already defined in \
             a/rotate-data-keys.toml"
        );
    }

    #[test]
    fn load_dir_reads_toml_files_sorted_and_skips_others() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("rotate-data-keys.toml", VALID_ROTATE);
        write(
            "check-alerts.toml",
            "name = \"check-alerts\"\nkind = \"check-alerts\"\nschedule = \"* * * * *\"\n",
        );
        write("README.md", "not a job");
        write(".#check-alerts.toml", "editor lock file");
        std::fs::create_dir(dir.path().join("sub.toml")).unwrap();

        let defs = load_dir(dir.path()).unwrap();
        let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["check-alerts", "rotate-data-keys"]);
        assert_eq!(defs[1].file, dir.path().join("rotate-data-keys.toml"));
    }

    #[test]
    fn load_dir_names_the_file_that_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("rotate-data-keys.toml"),
            VALID_ROTATE.replace("[\"data\"]", "[\"dta\"]"),
        )
        .unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        let expected_prefix = format!(
            "{}: options.purposes[0]",
            dir.path().join("rotate-data-keys.toml").display()
        );
        assert!(e.to_string().starts_with(&expected_prefix), "{e}");
    }

    #[test]
    fn load_dir_reports_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = load_dir(&missing).unwrap_err();
        assert!(
            matches!(e, JobDefError::ReadDir { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn accepts_five_field_unix_cron_as_second_zero() {
        let s = schedule("30 3 * * 1");
        assert_eq!(s.as_str(), "0 30 3 * * 1");
        assert_eq!(s, schedule("0 30 3 * * 1"));
        // 2025-06-01 is a Sunday, so the next Monday 03:30 is June 2nd.
        assert_eq!(
            s.next_after(utc(2025, 6, 1, 0, 0, 0)),
            Some(utc(2025, 6, 2, 3, 30, 0))
        );
    }

    #[test]
    fn normalizes_whitespace_to_single_spaces() {
        assert_eq!(schedule("  0  0\t3 * * *  ").as_str(), "0 0 3 * * *");
    }

    #[test]
    fn rejects_wrong_field_counts_with_the_expected_format() {
        for s in [
            "",
            "@daily",
            "0 3 * *",
            "0 0 0 3 * * 2030",
            "0 0 0 3 * * * *",
        ] {
            let e = Schedule::parse(s).unwrap_err();
            assert!(
                e.contains("expected 6 fields sec min hour dom month dow, or 5-field Unix cron"),
                "{s:?}: {e}"
            );
        }
    }

    #[test]
    fn rejects_out_of_range_fields_naming_the_field() {
        let e = Schedule::parse("61 * * * * *").unwrap_err();
        assert!(e.starts_with("seconds field \"61\" is invalid"), "{e}");
        assert!(e.contains("allowed: 0-59"), "{e}");
        let e = Schedule::parse("* * 25 * * *").unwrap_err();
        assert!(e.starts_with("hours field \"25\" is invalid"), "{e}");
        assert!(e.contains("allowed: 0-23"), "{e}");
        for (s, field) in [
            ("0 60 * * * *", "minutes"),
            ("0 0 0 32 * *", "day-of-month"),
            ("0 0 0 0 * *", "day-of-month"),
            ("0 0 0 * 13 *", "month"),
            ("0 0 0 * * 8", "day-of-week"),
            ("0 0 0 * * 1#6", "day-of-week"),
            ("*/0 * * * * *", "seconds"),
            ("0 10-5 * * * *", "minutes"),
            ("0 0 x * * *", "hours"),
            ("0 0 0 * FOO *", "month"),
        ] {
            let e = Schedule::parse(s).unwrap_err();
            assert!(e.starts_with(&format!("{field} field")), "{s:?}: {e}");
        }
    }

    #[test]
    fn rejects_an_empty_list_element() {
        let e = Schedule::parse("0 1,,2 * * * *").unwrap_err();
        assert!(
            e.starts_with("minutes field \"1,,2\" has an empty list element"),
            "{e}"
        );
        assert!(Schedule::parse(", * * * * *").is_err());
    }

    #[test]
    fn rejects_schedules_that_never_fire() {
        for s in [
            "0 0 0 31 2 *",
            "* * * 30 2 *",
            "0 0 31 4 *",
            "0 0 0 31 4,6,9,11 *",
        ] {
            let e = Schedule::parse(s).unwrap_err();
            assert!(e.contains("never fires"), "{s:?}: {e}");
        }
    }

    #[test]
    fn accepts_rare_but_real_dates() {
        // Leap day, and the fifth Monday of February, which needs a leap year
        // starting on a Monday (2016, 2044): beyond any short look-ahead.
        let leap = schedule("0 0 0 29 2 *");
        assert_eq!(
            leap.next_after(utc(2025, 1, 1, 0, 0, 0)),
            Some(utc(2028, 2, 29, 0, 0, 0))
        );
        let fifth_monday = schedule("0 0 0 * 2 1#5");
        assert_eq!(
            fifth_monday.next_after(utc(2025, 1, 1, 0, 0, 0)),
            Some(utc(2044, 2, 29, 0, 0, 0))
        );
    }

    #[test]
    fn rejects_restricting_both_day_of_month_and_day_of_week() {
        let e = Schedule::parse("0 0 0 1 * 1").unwrap_err();
        assert!(e.contains("both restricted"), "{e}");
        assert!(Schedule::parse("0 0 1 * MON").is_err());
        assert!(Schedule::parse("0 0 0 */2 * 1-5").is_err());
        // `?` counts as unrestricted, as in croner and Quartz.
        assert!(Schedule::parse("0 0 0 1 * ?").is_ok());
        assert!(Schedule::parse("0 0 0 ? * MON").is_ok());
    }

    #[test]
    fn accepts_names_l_w_and_hash_in_either_case() {
        let weekdays = schedule("0 0 9 * * mon-fri");
        assert_eq!(
            weekdays.next_after(utc(2025, 6, 6, 10, 0, 0)),
            Some(utc(2025, 6, 9, 9, 0, 0))
        );
        let last_day = schedule("0 0 0 L * *");
        assert_eq!(
            last_day.next_after(utc(2025, 2, 1, 0, 0, 0)),
            Some(utc(2025, 2, 28, 0, 0, 0))
        );
        let january = schedule("0 0 0 1 JAN *");
        assert_eq!(
            january.next_after(utc(2025, 2, 1, 0, 0, 0)),
            Some(utc(2026, 1, 1, 0, 0, 0))
        );
        assert!(Schedule::parse("0 0 0 15W * *").is_ok());
        assert!(Schedule::parse("0 0 0 * * 5L").is_ok());
    }

    #[test]
    fn next_after_is_strictly_after_and_ignores_subseconds() {
        let daily = schedule("0 0 3 * * *");
        assert_eq!(
            daily.next_after(utc(2025, 6, 1, 2, 59, 59)),
            Some(utc(2025, 6, 1, 3, 0, 0))
        );
        assert_eq!(
            daily.next_after(utc(2025, 6, 1, 3, 0, 0)),
            Some(utc(2025, 6, 2, 3, 0, 0))
        );
        assert_eq!(
            daily.next_after(utc(2025, 12, 31, 4, 0, 0)),
            Some(utc(2026, 1, 1, 3, 0, 0))
        );

        let every_second = schedule("* * * * * *");
        let t = utc(2025, 6, 1, 12, 0, 0) + chrono::Duration::milliseconds(500);
        let next = every_second.next_after(t).unwrap();
        assert_eq!(next, utc(2025, 6, 1, 12, 0, 1));
        assert_eq!(next.nanosecond(), 0);
        assert_eq!(
            every_second.next_after(utc(2025, 12, 31, 23, 59, 59)),
            Some(utc(2026, 1, 1, 0, 0, 0))
        );
    }

    #[test]
    fn next_after_finds_a_yearly_tick_across_the_year() {
        let yearly = schedule("0 0 0 1 1 *");
        assert_eq!(
            yearly.next_after(utc(2025, 1, 1, 0, 0, 0)),
            Some(utc(2026, 1, 1, 0, 0, 0))
        );
        assert_eq!(
            yearly.next_after(utc(2025, 7, 15, 8, 0, 0)),
            Some(utc(2026, 1, 1, 0, 0, 0))
        );
        assert_eq!(
            yearly.next_after(utc(2024, 12, 31, 23, 59, 59)),
            Some(utc(2025, 1, 1, 0, 0, 0))
        );
    }

    #[test]
    fn latest_tick_includes_now_and_ignores_subseconds() {
        let every_second = schedule("* * * * * *");
        let t = utc(2025, 6, 1, 12, 0, 0) + chrono::Duration::milliseconds(999);
        let latest = every_second.latest_tick_at_or_before(t).unwrap();
        assert_eq!(latest, utc(2025, 6, 1, 12, 0, 0));
        assert_eq!(latest.nanosecond(), 0);

        let daily = schedule("0 0 3 * * *");
        assert_eq!(
            daily.latest_tick_at_or_before(utc(2025, 6, 1, 3, 0, 0)),
            Some(utc(2025, 6, 1, 3, 0, 0))
        );
        assert_eq!(
            daily.latest_tick_at_or_before(utc(2025, 6, 1, 2, 59, 59)),
            Some(utc(2025, 5, 31, 3, 0, 0))
        );
        assert_eq!(
            daily.latest_tick_at_or_before(utc(2025, 1, 1, 0, 0, 0)),
            Some(utc(2024, 12, 31, 3, 0, 0))
        );
    }

    #[test]
    fn latest_tick_finds_a_yearly_tick_months_back() {
        let yearly = schedule("0 0 0 1 1 *");
        assert_eq!(
            yearly.latest_tick_at_or_before(utc(2025, 12, 31, 23, 59, 59)),
            Some(utc(2025, 1, 1, 0, 0, 0))
        );
        assert_eq!(
            yearly.latest_tick_at_or_before(utc(2025, 1, 1, 0, 0, 0)),
            Some(utc(2025, 1, 1, 0, 0, 0))
        );
        assert_eq!(
            yearly.latest_tick_at_or_before(utc(2024, 12, 31, 23, 59, 59)),
            Some(utc(2024, 1, 1, 0, 0, 0))
        );
        let leap = schedule("0 0 0 29 2 *");
        assert_eq!(
            leap.latest_tick_at_or_before(utc(2027, 6, 1, 0, 0, 0)),
            Some(utc(2024, 2, 29, 0, 0, 0))
        );
    }

    #[test]
    fn latest_tick_after_a_long_outage_is_immediate_for_an_every_second_schedule() {
        let every_second = schedule("* * * * * *");
        let now = utc(2030, 3, 4, 5, 6, 7);
        let started = std::time::Instant::now();
        assert_eq!(every_second.latest_tick_at_or_before(now), Some(now));
        assert_eq!(
            every_second.ticks_between(utc(2025, 1, 1, 0, 0, 0), now, 3),
            [
                utc(2025, 1, 1, 0, 0, 1),
                utc(2025, 1, 1, 0, 0, 2),
                utc(2025, 1, 1, 0, 0, 3)
            ]
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn ticks_between_is_half_open_and_capped() {
        let ten_minutes = schedule("0 */10 * * * *");
        let from = utc(2025, 6, 1, 12, 0, 0);
        let to = utc(2025, 6, 1, 12, 30, 0);
        assert_eq!(
            ten_minutes.ticks_between(from, to, 100),
            [
                utc(2025, 6, 1, 12, 10, 0),
                utc(2025, 6, 1, 12, 20, 0),
                utc(2025, 6, 1, 12, 30, 0)
            ]
        );
        assert_eq!(ten_minutes.ticks_between(from, to, 2).len(), 2);
        assert!(ten_minutes.ticks_between(to, from, 100).is_empty());
        assert!(ten_minutes.ticks_between(from, from, 100).is_empty());
    }

    /// Compares the searches with a second-by-second scan using croner's own
    /// matcher, a different code path from its forward and backward search.
    #[test]
    fn searches_agree_with_a_second_by_second_scan() {
        let from = utc(2025, 2, 27, 22, 0, 0);
        let to = utc(2025, 3, 2, 2, 0, 0);
        for expr in [
            "*/7 * * * * *",
            "0 */10 * * * *",
            "15 5-7 23 * * *",
            "0 0 0 L * *",
            "30 59 23 * * SAT",
            "0 0 3 * * *",
        ] {
            let s = schedule(expr);
            let mut scanned = Vec::new();
            let mut t = from + chrono::Duration::seconds(1);
            while t <= to {
                if s.cron.is_time_matching(&t).unwrap() {
                    scanned.push(t);
                }
                t += chrono::Duration::seconds(1);
            }
            assert!(!scanned.is_empty(), "{expr} should fire in the window");
            assert_eq!(s.ticks_between(from, to, usize::MAX), scanned, "{expr}");
            for probe in [
                to,
                to - chrono::Duration::seconds(3599),
                from + chrono::Duration::hours(25),
            ] {
                let latest = s.latest_tick_at_or_before(probe).unwrap();
                match scanned.iter().rev().find(|t| **t <= probe) {
                    Some(expected) => assert_eq!(latest, *expected, "{expr} at {probe}"),
                    // The scan starts at `from`; an earlier tick is all that can be checked.
                    None => assert!(latest <= from, "{expr} at {probe}: {latest}"),
                }
            }
        }
    }

    #[test]
    fn the_worker_parser_rejects_five_fields_but_takes_every_normalized_schedule() {
        // tokio-cron-scheduler's `Job::new_async` parses with these options, so a
        // 5-field line must be normalized before it reaches the worker.
        assert!(cron_parser().parse("0 3 * * *").is_err());
        for def in builtin_defaults() {
            assert!(
                cron_parser().parse(def.schedule.as_str()).is_ok(),
                "{}",
                def.name
            );
        }
    }

    #[test]
    fn either_day_semantics_give_the_same_ticks_for_accepted_schedules() {
        // `JobBuilder::with_schedule` parses without `dom_and_dow`; with at most one
        // day field restricted, both parsers must agree tick for tick.
        let or_parser = CronParser::builder().seconds(Seconds::Required).build();
        let from = utc(2025, 1, 1, 0, 0, 0);
        let to = utc(2025, 12, 31, 0, 0, 0);
        for expr in [
            "0 0 3 * * MON-FRI",
            "0 0 3 1,15 * *",
            "0 0 3 ? * 0",
            "0 0 3 L * ?",
        ] {
            let s = schedule(expr);
            let or_cron = or_parser.parse(s.as_str()).unwrap();
            let ours = s.ticks_between(from, to, 1000);
            let theirs: Vec<_> = or_cron.iter_after(from).take_while(|t| *t <= to).collect();
            assert!(!ours.is_empty());
            assert_eq!(ours, theirs, "{expr}");
        }
    }

    #[test]
    fn debug_shows_only_the_expression() {
        assert_eq!(
            format!("{:?}", schedule("0 0 3 * * *")),
            "Schedule(\"0 0 3 * * *\")"
        );
    }
}
