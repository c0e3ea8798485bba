//! The oslo.messaging envelope decoder and its JSON scanner on any body: the scanner walks
//! only the members it needs and must never read past the text or loop.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stacktap::amqp::Props;

fuzz_target!(|input: &[u8]| {
    let Some((&first, body)) = input.split_first() else {
        return;
    };
    // the exchange decides notification or RPC; the compression header a kombu body
    let exchange = ["nova", "openstack", "neutron", ""][usize::from(first & 3)];
    let props = Props {
        compression: (first & 4 != 0).then(|| "application/x-gzip".to_string()),
        ..Props::default()
    };
    let _ = stacktap::oslo::decode(exchange, &props, body, 1 << 20);
    if let Ok(text) = std::str::from_utf8(body) {
        let mut n = 0usize;
        let _ = stacktap::oslo::scan::members(text, |_, _| n += 1);
        // any member may be the nested one: its inner values, still escaped, read back
        let _ = stacktap::oslo::scan::members_nesting(
            text,
            "oslo.message",
            |_, _| {},
            |_, v, plain| {
                let _ = stacktap::oslo::scan::escaped_value(v);
                let _ = stacktap::oslo::scan::escaped_string(v, plain);
                let _ = stacktap::oslo::scan::nested_escaped_members(v, |_, _| {});
            },
        );
        let _ = stacktap::oslo::unescape(text);
        let _ = stacktap::oslo::parse_failure(text);
        // every member is at least one byte of text
        assert!(n <= text.len());
    }
});
