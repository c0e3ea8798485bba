//! TCP reassembly through the flow table: segments repeated, overlapping, reordered, with
//! holes, SYN/FIN/RST anywhere and sequence numbers wrapping. What the parser above it
//! receives is the stream: no empty chunk, nothing after the close, no byte twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stacktap::decode::{TcpFlags, TcpSegment};
use stacktap::health::Health;
use stacktap::tcp::flows::{App, Dir, FlowConfig, FlowTable};
use stacktap::tcp::stream::Chunk;
use stacktap::time::Ts;

/// One connection's parser: it only checks what it is given.
#[derive(Default)]
struct Checker {
    closed: bool,
}

/// Data bytes delivered per direction, over every connection.
#[derive(Default)]
struct Delivered([u64; 2]);

impl App for Checker {
    type Out = Delivered;
    fn on_chunk(&mut self, dir: Dir, _: Ts, chunk: Chunk<'_>, _: &mut Health, out: &mut Delivered) {
        assert!(!self.closed, "data after close");
        if let Chunk::Data(d) = chunk {
            assert!(!d.is_empty(), "an empty chunk");
            out.0[dir as usize] += d.len() as u64;
        }
    }
    fn on_close(&mut self, _: Ts, _: &mut Health, _: &mut Delivered) {
        assert!(!self.closed, "closed twice");
        self.closed = true;
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&isn_seed, input)) = input.split_first() else {
        return;
    };
    let cfg = FlowConfig {
        max_reorder_bytes: 4096,
        max_reorder_segments: 16,
        hole_timeout_s: 0.5,
        ..FlowConfig::default()
    };
    let mut table: FlowTable<Checker> = FlowTable::new(cfg);
    let mut delivered = Delivered::default();
    let mut health = Health::default();
    let (client, server) = stacktap_fuzz::ends(5672);
    // initial sequence numbers near the wrap, so that wrapping is exercised
    let mut next = [
        u32::MAX - u32::from(isn_seed) * 97,
        u32::from(isn_seed).wrapping_mul(0x0101_0101),
    ];
    let mut fed = [0u64; 2];
    for (i, s) in stacktap_fuzz::segments(input).enumerate() {
        let d = s.dir as usize;
        let seq = next[d].wrapping_add_signed(i32::from(s.offset));
        if s.offset == 0 {
            next[d] = next[d].wrapping_add(s.payload.len() as u32);
        }
        fed[d] += s.payload.len() as u64;
        let (src, dst) = match s.dir {
            Dir::ToServer => (client, server),
            Dir::ToClient => (server, client),
        };
        let seg = TcpSegment {
            src,
            dst,
            seq,
            ack: next[1 - d],
            flags: TcpFlags {
                syn: s.syn,
                ack: s.ack,
                fin: s.fin,
                rst: s.rst,
            },
            payload: s.payload,
        };
        // 100 ms apart: the hole timeout is reached within a few segments
        let ts = Ts(i as u64 * 100_000_000);
        table.segment(&seg, ts, &mut health, &mut delivered, |f| {
            Some((Checker::default(), f.client, f.server))
        });
    }
    table.close_all(Ts(u64::MAX / 2), &mut health, &mut delivered, &mut |_, _| {});
    // (the table names the sides itself: the first sender may be taken for the client)
    let (got, given) = (delivered.0[0] + delivered.0[1], fed[0] + fed[1]);
    assert!(
        got <= given,
        "{got} bytes delivered of {given} fed: a byte twice"
    );
});
