//! Field names of an idempotency record (`RedisKey::idempotency`): the digest of the start's
//! body, claimed before anything starts, and the response once the start succeeded.

/// SHA-256 (hex) of the body of the start that claimed the `Idempotency-Key`.
pub const F_BODY: &str = "body";
/// The JSON response of that start; absent while it is still running.
pub const F_RESPONSE: &str = "response";
