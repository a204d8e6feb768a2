//! OpenAI's Chat Completions API as a view of the bridge's streams (issue #15): the same start
//! path as `/api/chat/start`, answers rendered from the request's Redis stream entries.

pub mod chunks;
pub mod error;
pub mod routes;
