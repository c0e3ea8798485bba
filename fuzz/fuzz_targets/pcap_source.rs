//! The capture file reader (pcap and pcapng, either byte order, damaged records resynced)
//! and the packet decoder on any file: it must end, never panic, and read the same
//! through small blocks (the first byte sets their size) as through the usual ones.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stacktap::source::file::PcapFile;
use std::path::Path;

/// Each packet's time, link type and bytes, the damage (where, how much skipped) and
/// whether the file was cut short; None if it does not open.
type Whole = (Vec<(u64, i32, Vec<u8>)>, Vec<(u64, Option<u64>)>, bool);

fn read(file: &[u8], block: usize) -> Option<Whole> {
    let input = Box::new(std::io::Cursor::new(file.to_vec()));
    let mut f = PcapFile::in_blocks(Path::new("fuzz.pcap"), input, block).ok()?;
    let mut packets = Vec::new();
    // each record takes at least its header's bytes: the loop ends
    for _ in 0..=file.len() {
        match f.next_with(|p| (p.ts.0, p.linktype, p.data.to_vec())) {
            Ok(Some(p)) => {
                let _ = stacktap::decode::decode(p.1, &p.2);
                packets.push(p);
            }
            Ok(None) | Err(_) => {
                let damage = f.damage.iter().map(|d| (d.offset, d.skipped)).collect();
                return Some((packets, damage, f.truncated));
            }
        }
    }
    panic!("more records than bytes");
}

fuzz_target!(|input: &[u8]| {
    let Some((&size, file)) = input.split_first() else {
        return;
    };
    let usual = read(file, 1 << 20);
    let small = read(file, 1 + usize::from(size) * 3);
    assert_eq!(small, usual, "read through {}-byte blocks", 1 + usize::from(size) * 3);
});
