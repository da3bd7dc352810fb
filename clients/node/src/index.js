// cpmgr-client: the cpmgr sidecar's socket protocol for Node 20+, no dependencies.

export {
  CpmgrError,
  CpmgrProtocolError,
  CpmgrUnavailable,
  LineCore,
  MemberState,
  buildRequest,
} from "./core.js";
export { CpmgrClient, DEFAULT_SOCKET_PATH, Member, backoffDelay, defaultSocketPath } from "./client.js";
