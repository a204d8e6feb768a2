//! The AI SDK's UI message stream protocol (v1, the `ai` package's `useChat`) as a view of the
//! bridge's streams (issue #15): the same start path as `/api/chat/start`, answers rendered
//! from the request's Redis stream entries, resumable by chat id.

pub mod messages;
pub mod parts;
pub mod routes;
