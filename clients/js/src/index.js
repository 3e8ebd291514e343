// livegate: the JavaScript SDK of the live-chat gateway (ES module entry point).
// The single-file build (dist/livegate.js) exports the same names.

export { Client, connect, backoffDelay, DEFAULTS, VERSION } from "./client.js";
export { Conversations, CONVERSATION_DEFAULTS, dmId } from "./conversations.js";
export { Desk, DeskError, DESK_ROOMS } from "./desk.js";
export { GatewayError, UploadError, ErrorCodes } from "./errors.js";
export { ErrorCode, CloseCode, Priority, ABNORMAL_CLOSURE } from "./codes.js";
export { Emitter } from "./emitter.js";
export { createAdapter, browserAdapter, miniProgramAdapter, miniProgramUpload, browserUpload, alipayFileType, miniProgramMessageText, detectPlatform, memoryStorage, miniProgramStorage, browserStorage } from "./adapters.js";
export { MEDIA_KINDS, mediaUploadUrl, mediaBase, parseUploadResult } from "./media.js";
export { jwtExp, truncateUtf8, utf8Length, utf8Decode, base64Decode } from "./util.js";
