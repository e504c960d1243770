//! The audit log's writer: one thread with its own database connection that commits every
//! event waiting at once in one transaction (group commit: one fsync for many concurrent
//! requests), answers each caller with its seq once it is durable, and then publishes the
//! events to live subscribers (`?follow=1`).

use std::path::Path;
use std::sync::mpsc;

use crate::store::{Event, Store};
use tokio::sync::{broadcast, oneshot};

type Reply = oneshot::Sender<Result<u64, String>>;

/// Most events committed in one transaction.
const BATCH: usize = 512;

/// A handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    tx: mpsc::Sender<(Event, Reply)>,
    live: broadcast::Sender<(u64, Event)>,
}

impl EventLog {
    /// Opens the writer's own connection to the state database and starts its thread.
    pub fn start(state_dir: &Path) -> Result<EventLog, String> {
        let store = Store::open(state_dir).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<(Event, Reply)>();
        let (live, _) = broadcast::channel(4096);
        let publish = live.clone();
        std::thread::Builder::new()
            .name("moat-audit".into())
            .spawn(move || writer(store, rx, publish))
            .map_err(|e| format!("cannot start the audit writer thread: {e}"))?;
        Ok(EventLog { tx, live })
    }

    /// Stores `event` and returns its seq once it is committed: only then may the call it
    /// records be answered.
    pub async fn append(&self, event: Event) -> Result<u64, String> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send((event, reply))
            .map_err(|_| "the audit writer has stopped".to_string())?;
        wait.await
            .map_err(|_| "the audit writer has stopped".to_string())?
    }

    /// Events as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Event)> {
        self.live.subscribe()
    }
}

fn writer(store: Store, rx: mpsc::Receiver<(Event, Reply)>, live: broadcast::Sender<(u64, Event)>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let events: Vec<Event> = batch.iter().map(|(e, _)| e.clone()).collect();
        match store.append_events(&events) {
            Ok(seqs) => {
                for ((event, reply), seq) in batch.into_iter().zip(seqs) {
                    let _ = reply.send(Ok(seq));
                    let _ = live.send((seq, event));
                }
            }
            Err(e) => {
                let msg = format!("cannot store the audit event: {e}");
                for (_, reply) in batch {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
