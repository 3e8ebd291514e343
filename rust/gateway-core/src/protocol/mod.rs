//! Sans-I/O WebSocket protocol: framing, handshake, permessage-deflate, the codes and the
//! frames the engine builds itself, and the PROXY protocol header a load balancer may put
//! in front of it all. No sockets here.

pub mod codes;
pub mod deflate;
pub mod frame;
pub mod frames;
pub mod handshake;
pub mod proxy;

pub use codes::{close, error, CloseCode};
