//! Sans-I/O WebSocket protocol: framing, handshake, permessage-deflate, the codes and the
//! frames the engine builds itself. No sockets here.

pub mod codes;
pub mod deflate;
pub mod frame;
pub mod frames;
pub mod handshake;

pub use codes::{close, error, CloseCode};
