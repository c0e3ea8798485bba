//! Whole-run replay bench, side by side with tshark in the same run:
//!
//!   cargo bench --bench replay_vs_tshark [-- FILE]
//!
//! FILE defaults to target/bench/load.pcap; when it is missing, the generator records it
//! against the live broker (`minicloud.py record load --calls 6000`, ~110 MB; needs
//! STACKTAP_PYTHON and RabbitMQ). Prints MB/s for `stacktap replay FILE` and for
//! `tshark -r FILE -2 -Y amqp`, and their ratio. Throughput is reported, never asserted:
//! a timed assertion would flake on a shared machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn time(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert!(status.success(), "{cmd:?} failed");
    t.elapsed().as_secs_f64()
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let file = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bench/load.pcap"));
    if !file.exists() {
        let python = std::env::var("STACKTAP_PYTHON")
            .expect("set STACKTAP_PYTHON to record the bench capture");
        let out = file.parent().unwrap_or(Path::new("."));
        let ok = Command::new(python)
            .arg(root.join("sampledata/generator/minicloud.py"))
            .args(["record", "load", "--calls", "6000", "--out"])
            .arg(out)
            .status()
            .expect("run the generator")
            .success();
        assert!(ok && file.exists(), "could not record {}", file.display());
    }
    let size = std::fs::metadata(&file).unwrap().len() as f64 / 1e6;
    let bin = root.join("target/release/stacktap");
    assert!(
        bin.exists(),
        "build the release binary first: cargo build --release"
    );
    // warm the page cache so both tools read from memory
    let _ = std::fs::read(&file);
    let best = |f: &mut dyn FnMut() -> f64| (0..3).map(|_| f()).fold(f64::MAX, f64::min);
    let ours = best(&mut || time(Command::new(&bin).arg("replay").arg(&file)));
    let theirs = best(&mut || {
        time(
            Command::new("tshark")
                .arg("-r")
                .arg(&file)
                .args(["-2", "-Y", "amqp"]),
        )
    });
    println!("capture: {} ({size:.1} MB)", file.display());
    println!(
        "stacktap replay:         {:8.3} s  {:8.1} MB/s",
        ours,
        size / ours
    );
    println!(
        "tshark -2 -Y amqp:       {:8.3} s  {:8.1} MB/s",
        theirs,
        size / theirs
    );
    println!("ratio (stacktap/tshark): {:8.1}x", theirs / ours);
}
