// Protocol codes, defined once (docs/protocol.md): the server's error codes (in `error`
// frames), the close codes, and message priorities. Every other SDK file uses these names;
// none spells a code as a number. Each category is a plain object of UPPER_SNAKE names.

/** Error codes of the server's `error` frames (docs/protocol.md, "Error codes"). */
export const ErrorCode = {
  /** bad request: invalid JSON, not an object, missing or mistyped field */
  BAD_REQUEST: 4000,
  /** unknown op */
  UNKNOWN_OP: 4001,
  /** forbidden (join or publish not allowed by the rules or a hook) */
  FORBIDDEN: 4003,
  /** not joined to that room */
  NOT_JOINED: 4004,
  /** room name invalid or matches no route */
  INVALID_ROOM: 4005,
  /** message too large for this room (media: the file exceeds the route's limit for its kind) */
  TOO_LARGE: 4009,
  /** muted or banned */
  MUTED: 4010,
  /** rate limited (per user or per room), or too many requests waiting behind a slow hook */
  RATE_LIMITED: 4029,
  /** limit reached (rooms per connection or per node) */
  LIMIT_REACHED: 4030,
  /** not a member of that conversation */
  NOT_MEMBER: 4031,
  /** recall not allowed: too late, or not the sender */
  RECALL_DENIED: 4032,
  /** conversation unknown */
  NO_CONVERSATION: 4033,
  /** too many members */
  TOO_MANY_MEMBERS: 4034,
  /** media: no such file (never uploaded, removed, or judged risky) */
  MEDIA_NOT_FOUND: 4035,
  /** media: the file was uploaded by another user */
  MEDIA_NOT_YOURS: 4036,
  /** media: the file's kind is not the message type, or the route takes no such kind */
  MEDIA_KIND: 4037,
  /** media: already sent in another conversation, and the route forbids reuse */
  MEDIA_USED: 4038,
  /** rejected by a plugin (the message says why) */
  REJECTED: 4050,
  /** hook timed out and its fallback is deny */
  HOOK_TIMEOUT: 4080,
  /** internal error (the connection stays open) */
  INTERNAL: 5000,
  /** a durable message could not be stored: retry the publish with the same cid */
  STORE_UNAVAILABLE: 5030,
};

/** WebSocket close codes the server uses (docs/protocol.md, "Close codes"). */
export const CloseCode = {
  /** normal close */
  NORMAL: 1000,
  /** server going away (stop) */
  GOING_AWAY: 1001,
  /** protocol error (bad frame, unmasked client frame, bad opcode, ...) */
  PROTOCOL_ERROR: 1002,
  /** invalid UTF-8 in a text message or close reason */
  INVALID_UTF8: 1007,
  /** policy violation */
  POLICY: 1008,
  /** message or frame larger than the configured maximum */
  TOO_BIG: 1009,
  /** internal error */
  INTERNAL_ERROR: 1011,
  /** service restart (drain); reconnect after the `retry_ms` of the `drain` frame */
  SERVICE_RESTART: 1012,
  /** try again later (the node is at a connection cap) */
  TRY_AGAIN_LATER: 1013,
  /** heartbeat timeout (no frame within `idle_timeout`) */
  HEARTBEAT_TIMEOUT: 4000,
  /** authentication expired or failed ("token expired") */
  AUTH_FAILED: 4001,
  /** kicked (by the API or a moderator) */
  KICKED: 4003,
  /** replaced by a newer login of the same user (`single_session` routes) */
  REPLACED: 4004,
  /** slow consumer: the outbound queue overflowed with high-priority messages */
  SLOW_CONSUMER: 4008,
  /** abuse: too many errors or rate-limit violations in a row */
  ABUSE: 4029,
};

/** Message priorities (`prio` of `msg` frames). */
export const Priority = {
  LOW: 0,
  NORMAL: 1,
  HIGH: 2,
};

/** The code the SDK reports in `disconnect`/`close` events when the connection ended without
 * a close frame, or was declared dead locally (RFC 6455 "abnormal closure"; never sent on the
 * wire, hence not in `CloseCode`). */
export const ABNORMAL_CLOSURE = 1006;
