//! OpenTelemetry traces: every request stacktap rebuilds, as OTLP spans any tracing
//! backend (Jaeger, Tempo, an OpenTelemetry Collector) joins. `ids` derives the ids (a
//! contract), `spans` builds the spans from judged requests, `export` ships them, `config`
//! says where.

pub mod config;
pub mod export;
pub mod ids;
pub mod spans;

pub use config::OtlpConfig;

use crate::contract::Event;
use crate::correlate::Signal;
use export::Exporter;

/// The OTLP sink: judged requests (and events no request id ties to another) → spans →
/// the exporter.
pub struct OtlpSink {
    pub exporter: Exporter,
    scratch: Vec<spans::Built>,
    /// The capture replayed again (the demo's loop): its requests are new ones, so each
    /// pass after the first has its ids mixed with the pass number.
    pass: u64,
}

impl OtlpSink {
    pub fn new(exporter: Exporter) -> OtlpSink {
        OtlpSink {
            exporter,
            scratch: Vec::new(),
            pass: 0,
        }
    }

    /// What follows is the same traffic again, to be traced as new requests.
    pub fn next_pass(&mut self) {
        self.pass += 1;
    }

    pub fn on_signal(&mut self, s: &Signal) {
        match s {
            Signal::Request(tree) => spans::of_tree(tree, &mut self.scratch),
            Signal::Event(ev @ (Event::Rpc(_) | Event::Http(_) | Event::Notification(_)))
                if crate::trace::root_of(ev).is_none() =>
            {
                spans::of_lone_event(ev, &mut self.scratch)
            }
            _ => return,
        }
        if self.pass > 0 {
            let mix = xxhash_rust::xxh3::xxh3_128(&self.pass.to_be_bytes()).to_be_bytes();
            for b in &mut self.scratch {
                let s = &mut b.span;
                for id in [&mut s.trace_id, &mut s.span_id, &mut s.parent_span_id] {
                    id.iter_mut().zip(mix).for_each(|(x, m)| *x ^= m);
                }
            }
        }
        if !self.scratch.is_empty() {
            let encoded = self.scratch.drain(..).map(export::Encoded::from).collect();
            self.exporter.push(encoded);
        }
    }

    /// Everything handed over is exported (or counted as dropped) before this returns.
    pub fn close(&mut self) {
        self.exporter.close();
    }
}
