//! The gateway's HTTP API against a real `redis-server`, with the gateway in-process: property
//! tests of input handling (no 5xx, JSON 4xx, no Redis write for a refused request), checks
//! that the OpenAPI document matches the routes, and the rate-limit scripts on their own.
//!
//! One binary for the package (STYLE.md); each module is one area of the API.

mod connections;
mod content;
mod helpers;
mod limits;
mod openapi;
mod sessions;
mod shipped_configs;
mod sse;
mod start;
mod tenants;
