//! `canopy-proto`: every type that crosses a process or node boundary.
//!
//! The supervisor <-> runner protocol lives here: [`runner`] holds the typed messages
//! (tasks flowing down to a runner, events flowing up from it) and [`frame`] the wire
//! framing (a 4-byte big-endian length prefix followed by a MessagePack body) with a
//! version handshake. Decoding never panics: a truncated, oversized, garbage or
//! wrong-version frame is a typed [`ProtoError`].

pub mod error;
pub mod frame;
pub mod runner;

pub use error::ProtoError;
pub use frame::{FrameCodec, MAX_FRAME_LEN, read_frame, write_frame};
pub use runner::*;

/// The version of the supervisor <-> runner protocol. Bumped on any incompatible change;
/// both sides refuse to talk to a peer whose handshake names another version.
pub const PROTOCOL_VERSION: u32 = 4;

/// The magic string that opens every handshake, so that a runner started by mistake
/// against some other program's pipe fails fast with a clear error.
pub const HANDSHAKE_MAGIC: &str = "canopy-runner";
