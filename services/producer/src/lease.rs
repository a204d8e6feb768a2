//! Leases on claimed jobs. A job claimed by this producer stays pending in `llm:producers`
//! under its consumer name; while a worker runs it, the renewer resets its idle time every
//! `lease_renew_ms`. A producer that dies (or freezes) stops renewing, and once a job has been
//! idle for `lease_ms` another producer's `XAUTOCLAIM` takes it (see `claimer`).
//!
//! The renewer also notices when a job was taken while this producer was frozen (it is no
//! longer pending under our name) and tells the worker to stop at once, before the fence on its
//! next write would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fred::prelude::*;
use stream_io::groups::LeaseScript;
use stream_schema::keys::PRODUCER_GROUP;
use stream_schema::{EntryId, RedisKey};
use tokio_util::sync::CancellationToken;

/// The jobs this producer works on: entry id → the token that tells its worker the lease is
/// lost. Written by workers (insert on start, remove on end) and by the renewer (remove on
/// loss); read by the renewer, the reclaimer (to skip jobs already running here) and shutdown.
#[derive(Debug, Default)]
pub struct Leases {
    held: Mutex<HashMap<EntryId, CancellationToken>>,
}

impl Leases {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<EntryId, CancellationToken>> {
        // A poisoned lock only means a holder panicked mid-update; the map is still valid.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a job; `None` when a worker of this producer already runs it.
    pub fn acquire(&self, id: EntryId) -> Option<CancellationToken> {
        let mut held = self.held();
        if held.contains_key(&id) {
            return None;
        }
        let token = CancellationToken::new();
        held.insert(id, token.clone());
        Some(token)
    }

    pub fn release(&self, id: EntryId) {
        self.held().remove(&id);
    }

    pub fn contains(&self, id: EntryId) -> bool {
        self.held().contains_key(&id)
    }

    pub fn ids(&self) -> Vec<EntryId> {
        self.held().keys().copied().collect()
    }

    /// Tells the workers of `ids` that their leases are gone.
    fn lose(&self, ids: &[EntryId]) {
        let mut held = self.held();
        for id in ids {
            if let Some(token) = held.remove(id) {
                token.cancel();
            }
        }
    }
}

/// Renews every held lease each `interval` until `stop` is cancelled.
#[derive(Clone)]
pub struct Renewer {
    pub redis: Pool,
    pub script: LeaseScript,
    pub consumer: String,
    pub leases: Arc<Leases>,
    pub interval: Duration,
}

impl Renewer {
    pub async fn run(self, stop: CancellationToken) {
        let requests = RedisKey::requests();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ids = self.leases.ids();
            if ids.is_empty() {
                continue;
            }
            let renewed = self
                .script
                .renew(
                    self.redis.next(),
                    &requests,
                    PRODUCER_GROUP,
                    &self.consumer,
                    &ids,
                )
                .await;
            match renewed {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => {
                    // Renewing late is the only way to get here: this process stalled (or
                    // could not reach Redis) past the lease and another producer took over.
                    tracing::warn!(jobs = lost.len(), "leases lost to another producer");
                    metrics::counter!("producer_leases_lost_total").increment(lost.len() as u64);
                    self.leases.lose(&lost);
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot renew leases");
                    metrics::counter!("producer_lease_renew_errors_total").increment(1);
                }
            }
        }
    }
}
