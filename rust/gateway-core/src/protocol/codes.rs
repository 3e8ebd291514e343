//! Every code the engine sends or checks, defined once (docs/protocol.md: "Error codes"
//! and "Close codes"; priorities low = 0, normal = 1, high = 2).

/// A WebSocket close status code.
pub type CloseCode = u16;

/// Close codes (docs/protocol.md, "Close codes").
pub mod close {
    use super::CloseCode;
    pub const NORMAL: CloseCode = 1000;
    pub const GOING_AWAY: CloseCode = 1001;
    pub const PROTOCOL_ERROR: CloseCode = 1002;
    /// Reported when a close frame carried no status (never sent).
    pub const NO_STATUS: CloseCode = 1005;
    /// Reported when the TCP connection ended without a close handshake (never sent).
    pub const ABNORMAL: CloseCode = 1006;
    pub const INVALID_PAYLOAD: CloseCode = 1007;
    pub const POLICY: CloseCode = 1008;
    pub const TOO_BIG: CloseCode = 1009;
    pub const INTERNAL: CloseCode = 1011;
    pub const RESTART: CloseCode = 1012;
    pub const TRY_AGAIN_LATER: CloseCode = 1013;
    /// No frame from the client within the idle timeout.
    pub const IDLE_TIMEOUT: CloseCode = 4000;
    /// Authentication expired or failed.
    pub const AUTH: CloseCode = 4001;
    /// Kicked by the API or a moderator.
    pub const KICKED: CloseCode = 4003;
    /// Replaced by a newer login of the same user.
    pub const REPLACED: CloseCode = 4004;
    /// The outbound queue overflowed with high-priority messages.
    pub const SLOW_CONSUMER: CloseCode = 4008;
    /// Abuse: too many errors or rate-limit violations in a row.
    pub const ABUSE: CloseCode = 4029;

    /// Codes a server may put in a close frame (RFC 6455 §7.4: 1000, 1001, 1008,
    /// 1011-1013 and the registered/private range 3000-4999).
    pub fn server_may_send(code: CloseCode) -> bool {
        matches!(code, NORMAL | GOING_AWAY | POLICY | INTERNAL..=TRY_AGAIN_LATER | 3000..=4999)
    }

    /// Codes a client close frame may carry (RFC 6455 §7.4.1; 1004-1006 and 1015 never).
    pub fn peer_may_send(code: CloseCode) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Codes of `{"op":"error","code":…}` frames (docs/protocol.md, "Error codes").
pub mod error {
    pub const BAD_REQUEST: u16 = 4000;
    pub const UNKNOWN_OP: u16 = 4001;
    pub const FORBIDDEN: u16 = 4003;
    pub const NOT_JOINED: u16 = 4004;
    pub const BAD_ROOM: u16 = 4005;
    pub const TOO_LARGE: u16 = 4009;
    pub const MUTED: u16 = 4010;
    /// Rate limited, or the node is overloaded (the request was shed).
    pub const RATE_LIMITED: u16 = 4029;
    /// A cap was reached (rooms per connection or per node; used by the Python side).
    pub const LIMIT_REACHED: u16 = 4030;
    /// Conversations (used by the Python side): not a member, recall not allowed,
    /// conversation unknown, too many members.
    pub const NOT_MEMBER: u16 = 4031;
    pub const RECALL_DENIED: u16 = 4032;
    pub const NO_CONVERSATION: u16 = 4033;
    pub const TOO_MANY_MEMBERS: u16 = 4034;
    /// Media messages (used by the Python side): no such file, not the sender's, wrong
    /// kind, already sent elsewhere.
    pub const MEDIA_NOT_FOUND: u16 = 4035;
    pub const MEDIA_NOT_YOURS: u16 = 4036;
    pub const MEDIA_KIND: u16 = 4037;
    pub const MEDIA_USED: u16 = 4038;
    pub const PLUGIN: u16 = 4050;
    pub const HOOK_TIMEOUT: u16 = 4080;
    pub const INTERNAL: u16 = 5000;
    /// A durable message could not be committed (used by the Python side).
    pub const STORE_UNAVAILABLE: u16 = 5030;
}

/// Delivery priorities (backpressure policy in `conn.rs`).
pub const PRIO_LOW: u8 = 0;
pub const PRIO_NORMAL: u8 = 1;
pub const PRIO_HIGH: u8 = 2;
