//! The HTTP/1.x connection parser (heads, framing, pipelining, upgrades, bodies) on any
//! byte stream, split and holed as the fuzzer likes, joined and midstream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stacktap::health::Health;
use stacktap::http::conn::{HttpConfig, HttpConnection};
use stacktap::tcp::flows::App;
use stacktap::time::Ts;

fuzz_target!(|input: &[u8]| {
    let Some((&first, input)) = input.split_first() else {
        return;
    };
    let (client, server) = stacktap_fuzz::ends(8774);
    let cfg = HttpConfig {
        // small limits, so that the fuzzer reaches them
        max_head_bytes: 2048,
        max_pipeline: 4,
        max_error_body: 256,
    };
    let mut conn = HttpConnection::new(1, client, server, first & 1 == 1, cfg);
    let mut health = Health::default();
    let mut out = Vec::new();
    for (i, (dir, chunk)) in stacktap_fuzz::chunks(input).enumerate() {
        conn.on_chunk(dir, Ts(i as u64 * 1000), chunk, &mut health, &mut out);
        for ex in out.drain(..) {
            // an error body is held to its cap
            if let Some(r) = &ex.response {
                assert!(r.error_body.len() <= 256);
            }
        }
    }
    conn.on_close(Ts(u64::MAX / 2), &mut health, &mut out);
});
