//! The AMQP frame reader and connection state machine on any byte stream, split and holed
//! as the fuzzer likes; every message it assembles goes through the oslo decoder too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stacktap::amqp::AmqpConfig;
use stacktap::amqp::conn::{AmqpConnection, AmqpEvent, BodyBudget, ConnLimits};
use stacktap::health::Health;
use stacktap::tcp::flows::App;
use stacktap::time::Ts;

fuzz_target!(|input: &[u8]| {
    let Some((&first, input)) = input.split_first() else {
        return;
    };
    let cfg = AmqpConfig {
        // small limits, so that the fuzzer reaches them
        max_frame_bytes: 4096,
        max_body_bytes: 8192,
        max_held_bytes_per_connection: 16384,
        max_consumers_per_connection: 8,
        ..AmqpConfig::default()
    };
    let budget = BodyBudget::new(32768);
    // the first byte says whether the connection's start (the protocol header) was seen
    let mut conn = AmqpConnection::new(
        stacktap_fuzz::ends(5672),
        first & 1 == 1,
        ConnLimits::of(&cfg),
        budget.clone(),
    );
    let mut health = Health::default();
    let mut out = Vec::new();
    for (i, (dir, chunk)) in stacktap_fuzz::chunks(input).enumerate() {
        conn.on_chunk(dir, Ts(i as u64), chunk, &mut health, &mut out);
        decode_all(&mut out);
    }
    conn.on_close(Ts(u64::MAX / 2), &mut health, &mut out);
    decode_all(&mut out);
    drop(conn);
    assert_eq!(budget.held(), 0, "a closed connection holds no body bytes");
});

fn decode_all(out: &mut Vec<AmqpEvent>) {
    for ev in out.drain(..) {
        if let AmqpEvent::Message(m) = ev {
            let _ = stacktap::oslo::decode(&m.exchange, &m.props, &m.body, 1 << 20);
        }
    }
}
