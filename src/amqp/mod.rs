//! AMQP 0-9-1, passive: frames (with resync) → methods and whole messages per channel.
//!
//! Framing and resync are ours (a tap joins streams mid-way and must find frame boundaries
//! itself); method and content-header decoding is `amq-protocol`'s, generated from the spec.

pub mod conn;
pub mod frame;
pub mod names;

pub use conn::{AmqpConnection, AmqpEvent, Message, MessageKind, Props};
