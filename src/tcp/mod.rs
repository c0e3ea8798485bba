//! TCP: flows and per-direction reassembly, written by hand (see ARCHITECTURE.md: no
//! maintained crate reassembles passively with gap, ACK-beyond-hole and cap semantics).

pub mod flows;
pub mod stream;

pub use flows::{Dir, FlowConfig, FlowKey, FlowTable};
pub use stream::{Chunk, Stream, StreamConfig};
