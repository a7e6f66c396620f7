//! A tiny timing harness shared by the benches (`harness = false`), so the project needs no
//! benchmarking crate.
//!
//! Each case is warmed up, then timed in several samples of many iterations (one `Instant`
//! reading per sample, not per iteration, so the clock's own cost does not count); the table
//! shows the median ns/op over the samples, its min and max, and ops/s from the median.
//!
//! Modes, picked from the command line the way Cargo and cargo-nextest call bench targets:
//! * `cargo bench` passes `--bench`: full measurement. Further words filter cases by substring
//!   (`cargo bench --bench timers -- cancel`).
//! * Anything else (`cargo test --benches`, `cargo nextest run --all-targets`): a smoke run with
//!   sizes divided by 100 and two iterations per case, so the bench code is compiled and
//!   exercised by the test suite without slowing it down.
//! * `--list [--ignored]` (cargo-nextest's discovery): the binary lists one test, `smoke`.
#![allow(dead_code)] // each bench uses part of it

use std::fmt::Write as _;
use std::time::{Duration, Instant};

pub use std::hint::black_box;

/// Warm-up per case before measuring (also calibrates the iteration count).
const WARM_UP: Duration = Duration::from_millis(150);
/// Timed samples per case.
const SAMPLES: usize = 10;
/// Target duration of one sample.
const SAMPLE_TIME: Duration = Duration::from_millis(50);

/// One line of the results table.
struct Row {
    name: String,
    iters: u64,
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
}

/// The harness of one bench binary.
pub struct Harness {
    title: &'static str,
    smoke: bool,
    filters: Vec<String>,
    rows: Vec<Row>,
    notes: Vec<String>,
    started: Instant,
}

impl Harness {
    /// Read the command line. `None` when the binary was only asked to list its tests (the
    /// listing is printed already): return from `main` then.
    pub fn from_args(title: &'static str) -> Option<Harness> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.iter().any(|a| a == "--list") {
            // The nextest custom-harness protocol: "<name>: test" lines on stdout, nothing
            // when asked for ignored tests only.
            if !args.iter().any(|a| a == "--ignored") {
                println!("smoke: test");
            }
            return None;
        }
        let bench = args.iter().any(|a| a == "--bench");
        let exact = args.iter().any(|a| a == "--exact");
        let mut filters = Vec::new();
        let mut words = args.iter();
        while let Some(a) = words.next() {
            if matches!(
                a.as_str(),
                "--format" | "--test-threads" | "--color" | "--skip" | "--logfile" | "-Z"
            ) {
                words.next();
            } else if !a.starts_with('-') && !exact {
                filters.push(a.clone());
            }
        }
        let h = Harness {
            title,
            smoke: !bench,
            filters,
            rows: Vec::new(),
            notes: Vec::new(),
            started: Instant::now(),
        };
        if h.smoke {
            println!("{title}: smoke run (sizes / 100, 2 iterations); `cargo bench` measures");
        } else {
            println!(
                "{title}: measuring (warm-up {WARM_UP:?}, {SAMPLES} samples of ~{SAMPLE_TIME:?})"
            );
        }
        Some(h)
    }

    /// True in the smoke run.
    pub fn is_smoke(&self) -> bool {
        self.smoke
    }

    /// `n` when measuring; a hundredth of it in the smoke run.
    pub fn size(&self, n: usize) -> usize {
        if self.smoke {
            (n / 100).max(1)
        } else {
            n
        }
    }

    /// Is the case `name` selected by the command-line filters?
    pub fn wants(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }

    /// A line printed under the table (sizes, hit counts, ...).
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Time `f`, one call per iteration. Use `black_box` on inputs and results.
    pub fn bench<R>(&mut self, name: &str, mut f: impl FnMut() -> R) {
        self.bench_custom(name, u64::MAX, |iters| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            start.elapsed()
        });
    }

    /// Time a case that needs per-batch setup or teardown: `f(iters)` runs `iters` iterations
    /// and returns the time spent in the part to measure. It is never asked for more than
    /// `max_batch` at once (bounds the memory a batch's setup uses, or how far a data structure
    /// grows during one batch).
    pub fn bench_custom(&mut self, name: &str, max_batch: u64, mut f: impl FnMut(u64) -> Duration) {
        if !self.wants(name) {
            return;
        }
        let max_batch = max_batch.max(1);
        let mut run = |iters: u64| -> Duration {
            let mut left = iters;
            let mut total = Duration::ZERO;
            while left > 0 {
                let n = left.min(max_batch);
                total += f(n);
                left -= n;
            }
            total
        };
        if self.smoke {
            let elapsed = run(2);
            self.push(name, 2, &[elapsed.as_nanos() as f64 / 2.0]);
            return;
        }
        // Warm up, doubling the batch, until WARM_UP has passed; the last batch gives the
        // estimate of one iteration's cost.
        let warm_start = Instant::now();
        let mut iters = 1u64;
        let mut per_op = loop {
            let elapsed = run(iters);
            if warm_start.elapsed() >= WARM_UP {
                break elapsed.as_secs_f64() / iters as f64;
            }
            iters = iters.saturating_mul(2);
        };
        if per_op <= 0.0 {
            per_op = 1e-9;
        }
        let per_sample = ((SAMPLE_TIME.as_secs_f64() / per_op) as u64).max(1);
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let elapsed = run(per_sample);
            samples.push(elapsed.as_nanos() as f64 / per_sample as f64);
        }
        self.push(name, per_sample * SAMPLES as u64, &samples);
    }

    /// Record a case timed by the caller: `iters` operations took `elapsed` in total.
    pub fn record(&mut self, name: &str, iters: u64, elapsed: Duration) {
        if !self.wants(name) {
            return;
        }
        let ns = elapsed.as_nanos() as f64 / iters.max(1) as f64;
        self.push(name, iters, &[ns]);
    }

    fn push(&mut self, name: &str, iters: u64, samples_ns: &[f64]) {
        let mut sorted = samples_ns.to_vec();
        sorted.sort_by(f64::total_cmp);
        let row = Row {
            name: name.to_string(),
            iters,
            median_ns: sorted[sorted.len() / 2],
            min_ns: sorted[0],
            max_ns: sorted[sorted.len() - 1],
        };
        if !self.smoke {
            // Print as we go, so a long run shows progress.
            println!("  {}", format_row(&row));
        }
        self.rows.push(row);
    }

    /// Print the table.
    pub fn finish(self) {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{} ({:.1} s)",
            self.title,
            self.started.elapsed().as_secs_f64()
        );
        let _ = writeln!(
            out,
            "  {:<52} {:>11} {:>12} {:>14}   ns/op min..max",
            "name", "iterations", "ns/op", "ops/s"
        );
        for row in &self.rows {
            let _ = writeln!(out, "  {}", format_row(row));
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        print!("{out}");
    }
}

/// A size for a case name: 1000 -> "1k", 100000 -> "100k", 1000000 -> "1M".
pub fn count_label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn format_row(row: &Row) -> String {
    let ops = if row.median_ns > 0.0 {
        1e9 / row.median_ns
    } else {
        f64::INFINITY
    };
    format!(
        "{:<52} {:>11} {:>12} {:>14}   {}..{}",
        row.name,
        row.iters,
        fmt_ns(row.median_ns),
        fmt_count(ops),
        fmt_ns(row.min_ns),
        fmt_ns(row.max_ns)
    )
}

fn fmt_ns(ns: f64) -> String {
    if ns < 10.0 {
        format!("{ns:.2}")
    } else if ns < 1000.0 {
        format!("{ns:.1}")
    } else {
        format!("{ns:.0}")
    }
}

/// Thousands separated, for ops/s.
fn fmt_count(x: f64) -> String {
    if !x.is_finite() {
        return "inf".to_string();
    }
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Deterministic pseudo-random numbers (xorshift64*), so runs are comparable.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 pseudo-random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
