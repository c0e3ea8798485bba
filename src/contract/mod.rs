//! The contract: what stacktap's stages hand each other and the world. Events
//! (`--events-out`, DESIGN.md's field names), the observations a probe makes for the
//! analyser, and the plain data both carry. A leaf: it imports no stage.

mod endpoint;
mod event;
mod observation;
mod oslo;
mod trace_context;

pub use endpoint::{Endpoint, ip_text};
pub use event::*;
pub use observation::*;
pub use oslo::*;
pub use trace_context::*;
