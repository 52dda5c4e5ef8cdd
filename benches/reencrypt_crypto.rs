//! The re-encryption engine's CPU stage alone, in memory: how many tokens per
//! second `RotateKeys::rotate_rows` moves from key A to key B, on 1 and on 2
//! threads, exactly as the engine calls it (workers taking whole batches of
//! rows carrying their kid, one scratch per worker, one new `String` per
//! token).
//!
//! Compare with `python3 /work/shared/bench/fernet_rotate_peer.py` (Python
//! `cryptography`'s `MultiFernet.rotate`); `bench/reencrypt_bench.sh` runs
//! both side by side.
//!
//! Usage: `cargo bench --bench reencrypt_crypto -- [--n N] [--len BYTES]
//! [--batch ROWS] [--repeat R] [--distinct D]`. N rotations are made over D
//! distinct tokens (cycled, default min(N, 250,000)) so memory stays modest;
//! the work per rotation is identical. One JSON object on stdout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use keywarden::crypto::fernet::{FernetKey, FernetScratch};
use keywarden::reencrypt::rotate::{Outcome, RotateKeys};
use keywarden::reencrypt::target::{RowId, SourceRow};
use rand::{Rng, SeedableRng};

struct Args {
    n: usize,
    len: usize,
    batch: usize,
    repeat: usize,
    distinct: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        n: 1_000_000,
        len: 200,
        batch: 1000,
        repeat: 3,
        distinct: 250_000,
    };
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it: then only a quick smoke run.
    if !std::env::args().any(|a| a == "--bench") {
        a.n = 2000;
        a.repeat = 1;
    }
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut v = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a positive integer"))
        };
        match flag.as_str() {
            "--n" => a.n = v("--n"),
            "--len" => a.len = v("--len"),
            "--batch" => a.batch = v("--batch").max(1),
            "--repeat" => a.repeat = v("--repeat").max(1),
            "--distinct" => a.distinct = v("--distinct").max(1),
            _ => {} // --bench, and anything unknown
        }
    }
    a.distinct = a.distinct.min(a.n);
    a
}

fn loadavg1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// One timed run: rotations per wall-clock second and per CPU second.
struct Rate {
    per_s: f64,
    per_cpu_s: f64,
}

/// Rotates `n` tokens in batches, as the engine does: `threads` workers,
/// each taking whole batches in turn and re-encrypting them with its own
/// scratch.
fn run(keys: &RotateKeys, rows: &[SourceRow], n: usize, batch: usize, threads: usize) -> Rate {
    let next = AtomicUsize::new(0);
    let cpu = cpu_seconds();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut scratch = FernetScratch::default();
                loop {
                    let done = next.fetch_add(batch, Ordering::Relaxed);
                    if done >= n {
                        break;
                    }
                    let take = batch.min(n - done);
                    let start = done % rows.len();
                    let take = take.min(rows.len() - start);
                    let out = keys.rotate_rows(&rows[start..start + take], &mut scratch);
                    assert!(matches!(out[0], Outcome::Rotated(_)));
                }
            });
        }
    });
    let wall = t.elapsed().as_secs_f64();
    Rate {
        per_s: n as f64 / wall,
        per_cpu_s: n as f64 / (cpu_seconds() - cpu),
    }
}

fn main() {
    let a = parse_args();
    let load_before = loadavg1();
    let old = FernetKey::generate();
    let new = FernetKey::generate();
    let keys = RotateKeys::new(vec![
        ("dat_new".into(), new.clone()),
        ("dat_old".into(), old.clone()),
    ])
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    eprintln!("making {} tokens of {} B plaintext ...", a.distinct, a.len);
    let rows: Vec<SourceRow> = (0..a.distinct)
        .map(|i| {
            let p: Vec<u8> = (0..a.len)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                .collect();
            SourceRow {
                id: RowId::Int(i as i64),
                token: old.encrypt(&p, 1_700_000_000),
                kid: Some("dat_old".into()),
            }
        })
        .collect();
    // Correctness on a sample, outside the timing.
    for (r, o) in rows[..100]
        .iter()
        .zip(keys.rotate_rows(&rows[..100], &mut FernetScratch::default()))
    {
        let Outcome::Rotated(t) = o else {
            panic!("{o:?}")
        };
        assert_eq!(new.decrypt(&t).unwrap(), old.decrypt(&r.token).unwrap());
    }
    let (mut r1, mut r2, mut c1, mut c2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.repeat {
        let x = run(&keys, &rows, a.n, a.batch, 1);
        eprintln!(
            "1 thread, run {}: {:.0} rotations/s ({:.0} per CPU second)",
            i + 1,
            x.per_s,
            x.per_cpu_s
        );
        r1.push(x.per_s);
        c1.push(x.per_cpu_s);
        let y = run(&keys, &rows, a.n, a.batch, 2);
        eprintln!(
            "2 threads, run {}: {:.0} rotations/s ({:.0} per CPU second)",
            i + 1,
            y.per_s,
            y.per_cpu_s
        );
        r2.push(y.per_s);
        c2.push(y.per_cpu_s);
    }
    let (m1, m2) = (median(r1.clone()), median(r2.clone()));
    let (cpu1, cpu2) = (median(c1), median(c2));
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "bench": "reencrypt_crypto",
            "impl": "keywarden::reencrypt::rotate::RotateKeys::rotate_rows, one batch per worker (kid-directed rotate_from)",
            "n": a.n,
            "distinct_tokens": a.distinct,
            "plaintext_len": a.len,
            "batch": a.batch,
            "ops_per_s_1t": m1.round(),
            "ops_per_s_2t": m2.round(),
            "ratio_2t_1t": (m2 / m1 * 1000.0).round() / 1000.0,
            // Rotations per CPU second: equal on 1 and 2 threads means the
            // work itself scales and a wall-clock ratio under 2 is the
            // machine's other load (cores the run did not get).
            "ops_per_cpu_s_1t": cpu1.round(),
            "ops_per_cpu_s_2t": cpu2.round(),
            "cpu_efficiency_2t_vs_1t": (cpu2 / cpu1 * 1000.0).round() / 1000.0,
            "cores_used_2t": (m2 / cpu2 * 100.0).round() / 100.0,
            "runs_1t": r1.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "runs_2t": r2.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "cpu_count": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "loadavg1_before": load_before,
            "loadavg1_after": loadavg1(),
        }))
        .unwrap()
    );
}
