//! Sans-I/O WebSocket protocol: framing, handshake, permessage-deflate. No sockets here.

pub mod deflate;
pub mod frame;
pub mod handshake;

/// A WebSocket close status code.
pub type CloseCode = u16;

/// Close codes used by the engine (see docs/protocol.md).
pub mod close {
    use super::CloseCode;
    pub const NORMAL: CloseCode = 1000;
    pub const GOING_AWAY: CloseCode = 1001;
    pub const PROTOCOL_ERROR: CloseCode = 1002;
    pub const INVALID_PAYLOAD: CloseCode = 1007;
    pub const POLICY: CloseCode = 1008;
    pub const TOO_BIG: CloseCode = 1009;
    pub const INTERNAL: CloseCode = 1011;
    pub const RESTART: CloseCode = 1012;
    /// No frame from the client within the idle timeout.
    pub const IDLE_TIMEOUT: CloseCode = 4000;
    /// The outbound queue overflowed with high-priority messages.
    pub const SLOW_CONSUMER: CloseCode = 4008;
}
