//! HTTP/1.x, passive: both directions framed into messages, responses paired with their
//! requests per connection. Syntax is httparse's; framing, pairing and resync are ours
//! (a tap joins mid-stream, loses segments and must never pair the wrong response).

pub mod conn;
pub mod head;

pub use conn::{End, Exchange, HttpConfig, HttpConnection};
