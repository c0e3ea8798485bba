//! Whole-run replay bench, side by side with tshark in the same run:
//!
//!   cargo bench --bench replay_vs_tshark [-- FILE]
//!
//! Without FILE, two captures are measured, recorded against the live broker when missing
//! (needs STACKTAP_PYTHON, RabbitMQ and the API ports free):
//! * target/bench/load.pcap: `minicloud.py record load --calls 6000` (~110 MB of RPC);
//! * target/bench/rest.pcap: `minicloud.py record rest --calls 4000` (~85 MB of REST, the
//!   RPCs the boots cause, and keystone token traffic).
//!
//! Prints wall-clock and CPU-time throughput of `stacktap replay --threads 1 FILE`, of the
//! same on every core (`--threads` = the cores), and of
//! `tshark -r FILE -2 -Y 'amqp or http'` (stacktap's default API ports decoded as HTTP), and
//! their ratios. The stacktap measured is the profile-guided build the packages ship
//! (`scripts/build-pgo`, run first: about ten minutes for each new commit, seconds while
//! the checkout stays the same; STACKTAP_BENCH_BIN names another binary instead); the plain
//! release build's one thread is measured beside it, in the same rounds.
//! Throughput is reported, never asserted: a timed assertion would flake on a shared machine.
//!
//! Before each pair of runs it times a cache line's round trip between two cores. On the
//! development VM that time takes one of three values for minutes at a time, ~60 ns,
//! 100–170 ns and 400–560 ns (the hypervisor places the two vCPUs on nearer or farther
//! physical cores): threads that hand data to each other pay for it, separate processes do
//! not. The two-thread figures are reported for each kind of pair, so that a run can be
//! read for what it measured.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Bands of a cache line's round trip between the two cores (the VM has shown three, for
/// minutes to hours at a time: ~60 ns, 100–170 ns and 400–560 ns): (name, from, to).
const BANDS: [(&str, f64, f64); 3] = [
    ("near", 0.0, 100.0),
    ("middling", 100.0, 300.0),
    ("far", 300.0, f64::INFINITY),
];

/// Nanoseconds of one round trip of a cache line between two threads on two cores (the
/// median of a few tries of 100,000 round trips each): the cost of every hand-over
/// between the stages of a multi-threaded replay.
fn core_round_trip_ns() -> f64 {
    const TRIPS: u64 = 100_000;
    let tries: Vec<f64> = (0..5)
        .map(|_| {
            let flag = Arc::new(AtomicU64::new(0));
            let echo = {
                let flag = flag.clone();
                std::thread::spawn(move || {
                    pin_to(1);
                    for i in 0..TRIPS {
                        while flag.load(Ordering::Acquire) != 2 * i + 1 {
                            std::hint::spin_loop();
                        }
                        flag.store(2 * i + 2, Ordering::Release);
                    }
                })
            };
            pin_to(0);
            let t = Instant::now();
            for i in 0..TRIPS {
                flag.store(2 * i + 1, Ordering::Release);
                while flag.load(Ordering::Acquire) != 2 * i + 2 {
                    std::hint::spin_loop();
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / TRIPS as f64;
            echo.join().expect("echo thread");
            ns
        })
        .collect();
    unpin();
    median(tries)
}

/// The middle value (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Keeps the calling thread on one core, so that the two ends of a round trip are on two.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read the set we own
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lets the calling thread run on every core again (the replays it starts inherit it).
fn unpin() {
    // the cores online, not `available_parallelism`: that counts the pinned set
    // SAFETY: sysconf reads a system value
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    // SAFETY: as in `pin_to`
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cores {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// (wall seconds, CPU seconds) of one run.
type Timing = (f64, f64);
/// One thread's run and every core's, back to back.
type Pair = (Timing, Timing);

/// CPU seconds (user + system) used by finished children so far.
fn children_cpu() -> f64 {
    // SAFETY: a zeroed rusage is a valid value; getrusage fills the struct we own
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The wall and CPU time of one run.
fn time(cmd: &mut Command) -> Timing {
    let cpu0 = children_cpu();
    let t = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert!(status.success(), "{cmd:?} failed");
    (t.elapsed().as_secs_f64(), children_cpu() - cpu0)
}

/// Wall seconds of `n` copies of one command started together, until the last ends.
fn time_together(n: usize, make: impl Fn() -> Command) -> f64 {
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            make()
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().expect("wait").success(), "a copy failed");
    }
    t.elapsed().as_secs_f64()
}

/// Records `scenario` with the generator into `dir` (its capture is `dir/scenario.pcap`).
fn record(root: &Path, scenario: &str, calls: &str, dir: &Path) -> PathBuf {
    let python =
        std::env::var("STACKTAP_PYTHON").expect("set STACKTAP_PYTHON to record the bench capture");
    let ok = Command::new(python)
        .arg(root.join("sampledata/generator/minicloud.py"))
        .args(["record", scenario, "--calls", calls, "--out"])
        .arg(dir)
        .status()
        .expect("run the generator")
        .success();
    let file = dir.join(format!("{scenario}.pcap"));
    assert!(ok && file.exists(), "could not record {}", file.display());
    file
}

/// The binary to measure: STACKTAP_BENCH_BIN, else the profile-guided build
/// (`scripts/build-pgo` makes it, or finds it made, and prints its path).
fn shipped_binary(root: &Path) -> PathBuf {
    if let Some(bin) = std::env::var_os("STACKTAP_BENCH_BIN") {
        return PathBuf::from(bin);
    }
    let mut build = Command::new(root.join("scripts/build-pgo"));
    // as from a shell: without what cargo set for this bench (its package's variables,
    // OUT_DIR, the library path into target/release), which are not the builds' to see
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let cargos = name.starts_with("CARGO") && name != "CARGO_HOME";
        if cargos
            || matches!(
                &*name,
                "OUT_DIR" | "LD_LIBRARY_PATH" | "RUST_RECURSION_COUNT"
            )
        {
            build.env_remove(&*name);
        }
    }
    let out = build
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-pgo");
    assert!(out.status.success(), "scripts/build-pgo failed");
    let path = String::from_utf8(out.stdout).expect("a path");
    PathBuf::from(path.trim())
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bins = Binaries {
        shipped: shipped_binary(&root),
        plain: PathBuf::from(env!("CARGO_BIN_EXE_stacktap")),
    };
    let given: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .collect();
    if !given.is_empty() {
        for f in given {
            bench(&bins, &f);
        }
        return;
    }
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let load = dir.join("load.pcap");
    if !load.exists() {
        record(&root, "load", "6000", &dir);
    }
    bench(&bins, &load);
    let rest = dir.join("rest.pcap");
    if !rest.exists() {
        record(&root, "rest", "4000", &dir);
    }
    bench(&bins, &rest);
}

/// Runs of stacktap, one thread and every core taken in turn.
const ROUNDS: usize = 9;
/// Runs of tshark (each takes seconds).
const TSHARK_RUNS: usize = 3;

/// The build measured, and the plain release build (no profile) beside it.
struct Binaries {
    shipped: PathBuf,
    plain: PathBuf,
}

fn bench(bins: &Binaries, file: &Path) {
    let size = std::fs::metadata(file).unwrap().len() as f64 / 1e6;
    // warm the page cache so that both tools read from memory
    let _ = std::fs::read(file);
    // the best run: on a shared VM the minimum is the least disturbed one. CPU time (user +
    // system, over every thread) is not inflated by steal or waiting.
    let best = |runs: &[(f64, f64)]| {
        runs.iter()
            .fold((f64::MAX, f64::MAX), |a, b| (a.0.min(b.0), a.1.min(b.1)))
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let replay_with = |bin: &Path, threads: usize| {
        let mut c = Command::new(bin);
        c.args(["replay", "--threads", &threads.to_string()])
            .arg(file);
        c
    };
    let replay = |threads: usize| replay_with(&bins.shipped, threads);
    let ours = |threads: usize| time(&mut replay(threads));
    // one thread and every core in turn, so that each pair of runs meets the VM in the
    // same mood: the median of the pairs' ratios is steadier than the ratio of two bests
    let mut ceilings = Vec::new();
    let mut trips = Vec::new();
    let mut plain = Vec::new();
    let pairs: Vec<Pair> = (0..ROUNDS)
        .map(|_| {
            trips.push(if cores > 1 { core_round_trip_ns() } else { 0.0 });
            let (one, all) = (ours(1), ours(cores));
            plain.push(time(&mut replay_with(&bins.plain, 1)));
            // the machine's own ceiling: `cores` one-thread replays sharing nothing but the
            // machine; no N-thread run can gain more than these do over one
            let together = time_together(cores, || replay(1));
            ceilings.push(cores as f64 * one.0 / together);
            (one, all)
        })
        .collect();
    let ceiling = median(ceilings);
    let one = best(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let all = best(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let median_ratio = median(pairs.iter().map(|(a, b)| a.0 / b.0).collect());
    let plain_ratio = median(
        plain
            .iter()
            .zip(&pairs)
            .map(|(p, (o, _))| p.0 / o.0)
            .collect(),
    );
    let plain = best(&plain);
    // tshark decodes AMQP on 5672 by itself; the OpenStack API ports must be named (the
    // ones stacktap reads as REST by default, so that both tools read the same packets)
    let mut decode_as = Vec::new();
    for (port, _) in stacktap::openstack::services::DEFAULT_PORTS {
        decode_as.push("-d".to_string());
        decode_as.push(format!("tcp.port=={port},http"));
    }
    let tshark: Vec<(f64, f64)> = (0..TSHARK_RUNS)
        .map(|_| {
            time(
                Command::new("tshark")
                    .arg("-r")
                    .arg(file)
                    .args(["-2", "-Y", "amqp or http"])
                    .args(&decode_as),
            )
        })
        .collect();
    let theirs = best(&tshark);
    println!("capture: {} ({size:.1} MB)", file.display());
    println!("stacktap: {}", bins.shipped.display());
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>9}",
        "", "wall s", "MB/s", "cpu s", "MB/s"
    );
    let on_all = format!("stacktap --threads {cores}");
    for (name, (wall, cpu)) in [
        ("stacktap --threads 1", one),
        (on_all.as_str(), all),
        ("plain build, 1 thread", plain),
        ("tshark -2 -Y amqp|http", theirs),
    ] {
        println!(
            "{name:<24} {wall:9.3} {:9.1} {cpu:9.3} {:9.1}",
            size / wall,
            size / cpu
        );
    }
    println!(
        "ratio stacktap/tshark, one thread: wall {:.1}x, cpu {:.1}x",
        theirs.0 / one.0,
        theirs.1 / one.1
    );
    println!(
        "{cores} threads against one: wall {:.2}x best to best, {median_ratio:.2}x median of {ROUNDS} back-to-back pairs (cpu {:.2}x as much); against tshark: wall {:.1}x",
        one.0 / all.0,
        all.1 / one.1,
        theirs.0 / all.0
    );
    println!(
        "against the plain release build (no profile), one thread: wall {:.2}x best to best, {plain_ratio:.2}x median of {ROUNDS} pairs",
        plain.0 / one.0
    );
    println!(
        "the machine's ceiling: {cores} one-thread replays at once got through {ceiling:.2}x the work of one in the same wall time (median of {ROUNDS})"
    );
    if cores > 1 {
        by_distance(&pairs, &trips);
    }
}

/// The pairs' {cores}-thread gain over one thread, apart for each band of `BANDS` (a
/// cache line's round trip between the cores just before the pair).
fn by_distance(pairs: &[Pair], trips: &[f64]) {
    for (kind, from, to) in BANDS {
        let mut ratios = Vec::new();
        let mut cpu = Vec::new();
        let mut ns = Vec::new();
        for ((one, all), trip) in pairs.iter().zip(trips) {
            if (from..to).contains(trip) {
                ratios.push(one.0 / all.0);
                cpu.push(all.1 / one.1);
                ns.push(*trip);
            }
        }
        if ratios.is_empty() {
            println!("pairs on {kind} cores (round trip {from}-{to} ns): none this run");
            continue;
        }
        let best = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "pairs on {kind} cores ({} of {}, round trip median {:.0} ns): wall {:.2}x median, {best:.2}x best pair; cpu {:.2}x as much",
            ratios.len(),
            pairs.len(),
            median(ns),
            median(ratios),
            median(cpu),
        );
    }
}
