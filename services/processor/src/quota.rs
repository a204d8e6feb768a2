//! Token-quota settlement: a start reserved `maxTokens` (or an estimate) against its API key's
//! window; when the request finishes, the processor gives back what it did not use (or charges
//! what it used beyond). Exactly once: `stream_io::quotas` sets a marker per request in the same
//! script.

use fred::prelude::*;
use stream_io::StreamIoError;
use stream_io::quotas::Quotas;
use stream_schema::{RequestId, RequestMeta};

#[derive(Clone)]
pub struct Reconciler {
    quotas: Quotas,
    /// How long settlement markers live: past two windows a refund has nothing to adjust.
    marker_ttl_secs: u64,
}

impl Reconciler {
    pub fn new(window_secs: u64) -> Self {
        Self {
            quotas: Quotas::default(),
            marker_ttl_secs: window_secs.saturating_mul(4).max(60),
        }
    }

    /// Settles the reservation of a finished request that produced `completion_tokens`, from
    /// its metadata (read once per request by the consumer). Requests without a reservation
    /// (no token limit) or without metadata (expired) are skipped.
    pub async fn settle(
        &self,
        client: &Client,
        request_id: &RequestId,
        meta: Option<&RequestMeta>,
        completion_tokens: u32,
    ) -> Result<(), StreamIoError> {
        let Some((meta, reservation)) = meta.and_then(|m| m.reservation.map(|r| (m, r))) else {
            return Ok(());
        };
        self.quotas
            .settle(
                client,
                &meta.key_id,
                request_id,
                reservation,
                completion_tokens,
                self.marker_ttl_secs,
            )
            .await?;
        Ok(())
    }
}
