//! Owner of the job stream `llm:requests` and of each request's metadata hash
//! `llm:request:{request}`: the gateway enqueues a job with its metadata, the gateway (SSE,
//! cancel) and the processor (key id, quota) load the metadata, and the producer deletes a job
//! once its attempt is done.

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::Value;
use stream_schema::keys::PRODUCER_GROUP;
use stream_schema::{DecodeError, EntryId, Job, RedisKey, RequestId, RequestMeta};

use crate::error::StreamIoError;
use crate::groups;

/// Stores a request's metadata (expiring after `meta_ttl_secs`) and appends its job to the job
/// stream (capped at about `jobs_maxlen`), in one pipeline: one round trip.
pub async fn enqueue(
    client: &Client,
    meta: &RequestMeta,
    job: &Job,
    meta_ttl_secs: u64,
    jobs_maxlen: u64,
) -> Result<(), StreamIoError> {
    let meta_key = RedisKey::request_meta(&job.request_id);
    let ttl = i64::try_from(meta_ttl_secs).unwrap_or(i64::MAX);
    let pipeline = client.pipeline();
    let _: () = pipeline.hset(meta_key.as_str(), meta.encode()).await?;
    let _: () = pipeline.expire(meta_key.as_str(), ttl, None).await?;
    let _: () = pipeline
        .xadd(
            RedisKey::requests().as_str(),
            false,
            crate::approx_cap(jobs_maxlen),
            "*",
            job.encode(),
        )
        .await?;
    let _: Vec<Value> = pipeline.all().await?;
    Ok(())
}

/// A request's metadata as Redis holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredMeta {
    Found(RequestMeta),
    /// Expired, or no such request.
    Missing,
    /// Present but unreadable (a foreign or newer writer): callers log it and go on without.
    Undecodable(DecodeError),
}

impl StoredMeta {
    /// The metadata, if it could be read.
    pub fn found(self) -> Option<RequestMeta> {
        match self {
            Self::Found(meta) => Some(meta),
            Self::Missing | Self::Undecodable(_) => None,
        }
    }
}

/// Loads a request's metadata: one `HGETALL`.
pub async fn load_meta(client: &Client, request: &RequestId) -> Result<StoredMeta, StreamIoError> {
    let fields: HashMap<String, String> = client
        .hgetall(RedisKey::request_meta(request).as_str())
        .await?;
    if fields.is_empty() {
        return Ok(StoredMeta::Missing);
    }
    Ok(match RequestMeta::decode(&fields) {
        Ok(meta) => StoredMeta::Found(meta),
        Err(error) => StoredMeta::Undecodable(error),
    })
}

/// Whether the metadata [`enqueue`] writes is in Redis: after an `enqueue` whose reply was lost
/// (a timeout), true means its pipeline ran (the job follows the metadata in the same write,
/// and Redis runs a connection's commands in order), so the request is queued. Ask on the
/// client `enqueue` used, so the question queues behind the pipeline.
pub async fn meta_exists(client: &Client, request: &RequestId) -> Result<bool, StreamIoError> {
    let found: i64 = client
        .exists(RedisKey::request_meta(request).as_str())
        .await?;
    Ok(found > 0)
}

/// Acks a job in group `llm:producers` and deletes it: its result lives in the session
/// stream, and deleting keeps the job stream as long as the backlog, not as long as history.
pub async fn delete_job(client: &Client, job: EntryId) -> Result<(), StreamIoError> {
    let key = RedisKey::requests();
    groups::ack(client, key.as_str(), PRODUCER_GROUP, &[job]).await?;
    let _: i64 = client.xdel(key.as_str(), job.to_string()).await?;
    Ok(())
}
