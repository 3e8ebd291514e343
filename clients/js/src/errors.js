// Errors: server error codes are numbers (docs/protocol.md); client-side ones are strings.

/** Client-side error codes (strings, so they never collide with the server's numbers, which
 * are `ErrorCode` in codes.js). */
export const ErrorCodes = {
  /** publish while disconnected with `offline: "reject"` */
  OFFLINE: "E_OFFLINE",
  /** publish while disconnected and the offline queue is full */
  QUEUE_FULL: "E_QUEUE_FULL",
  /** no ack within `requestTimeout` */
  TIMEOUT: "E_TIMEOUT",
  /** the connection dropped after a publish was sent and before its ack: it may or may not
   * have been delivered */
  CONNECTION_LOST: "E_CONNECTION_LOST",
  /** `client.close()` was called, or the server ended the session for good (kicked,
   * replaced by a newer login) */
  CLOSED: "E_CLOSED",
  /** an upload failed without an HTTP answer (network error, the platform's upload API
   * failed) or its answer was not the server's JSON */
  UPLOAD_FAILED: "E_UPLOAD",
  /** the upload was aborted (`abort()` of the promise `upload()`/`sendImage()`... returned) */
  ABORTED: "E_ABORTED",
};

/** A rejected request. `code` is the server's error code (a number, one of `ErrorCode` in
 * codes.js, e.g. `ErrorCode.RATE_LIMITED`) or one of `ErrorCodes` (a string). `id` is the request id, `frame` the
 * server's error frame (if any). */
export class GatewayError extends Error {
  constructor(code, message, id, frame) {
    super(code + ": " + message);
    this.name = "GatewayError";
    this.code = code;
    this.reason = message;
    this.id = id === undefined ? null : id;
    this.frame = frame || null;
  }
}

/** A failed media upload (`client.upload()`, `sendImage()`, `sendVoice()`, `sendFile()`).
 * `status`: the HTTP status (0 without an answer); `code`: the server's JSON `code`
 * ("auth" 401, "bad_request" 400, "too_large" 413, "type" 415, "quota" 429, "timeout" 408,
 * "busy" 503) or E_UPLOAD / E_ABORTED; `limit`: the byte limit of a 413 (else null); `body`:
 * the server's JSON answer, if any. */
export class UploadError extends GatewayError {
  constructor(code, message, status, body) {
    super(code, message);
    this.name = "UploadError";
    this.status = status || 0;
    this.body = body || null;
    this.limit = body && typeof body.limit === "number" ? body.limit : null;
  }
}
