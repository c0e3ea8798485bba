//! The capture file reader (pcap and pcapng, either byte order, damaged records resynced)
//! and the packet decoder on any file: it must end, and never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stacktap::source::Packet;
use stacktap::source::file::PcapFile;

fuzz_target!(|input: &[u8]| {
    let reader = Box::new(std::io::Cursor::new(input.to_vec()));
    let Ok(mut file) = PcapFile::from_reader(std::path::Path::new("fuzz.pcap"), reader) else {
        return;
    };
    let mut pkt = Packet::default();
    // each record takes at least its header's bytes: the loop ends
    for _ in 0..=input.len() {
        match file.next_into(&mut pkt) {
            Ok(true) => {
                let _ = stacktap::decode::decode(pkt.linktype, &pkt.data);
            }
            Ok(false) | Err(_) => return,
        }
    }
    panic!("more records than bytes");
});
