//! The gateway's HTTP API against a real `redis-server`, with the gateway in-process: property
//! tests of input handling (no 5xx, JSON 4xx, no Redis write for a refused request) and checks
//! that the OpenAPI document matches the routes.
//!
//! One binary for the package (STYLE.md); each module is one area of the API.

mod helpers;
mod openapi;
mod sessions;
mod shipped_configs;
mod sse;
mod start;
