//! What the nodes of a fleet pass each other through etcd besides the route states: the
//! commands a node that does not lead takes and the leader carries out, and the leader's
//! notices, which every node repeats on its own event stream.
//!
//! - **Commands.** A node puts `{prefix}/commands/{id}` (a [`Forwarded`], under its own lease,
//!   so it goes if that node dies) and watches `{prefix}/answers/{id}`. The leader watches
//!   `{prefix}/commands/`; it first claims a command (`{prefix}/claims/{id}`, put only if absent,
//!   under the sender's lease) so that no command is carried out twice, not even by a leader
//!   that takes over from one that died with it, then carries it out and puts the [`Answer`].
//!   The sender deletes the three keys once it has the answer.
//! - **Notices.** The leader puts each notice at `{prefix}/notices/{node}` (under its lease), in
//!   the order it makes them; the others watch `{prefix}/notices/` and send each one on.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};

use super::{FleetError, Membership};
use crate::store::etcd::retry;

/// A command taken by one node for the leader to carry out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forwarded {
    /// The node that took it.
    #[serde(rename = "from")]
    pub from: String,
    /// Who asked (as that node's admin API knows them).
    #[serde(rename = "actor")]
    pub actor: String,
    #[serde(rename = "service")]
    pub service: String,
    #[serde(rename = "command")]
    pub command: Command,
    /// The sender's lease: the claim lives under it.
    #[serde(rename = "lease")]
    pub lease: i64,
}

/// The commands that are forwarded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Command {
    #[serde(rename = "deploy")]
    Deploy {
        #[serde(rename = "version")]
        version: String,
        #[serde(rename = "upstreams")]
        upstreams: Vec<String>,
    },
    #[serde(rename = "promote")]
    Promote,
    #[serde(rename = "abort")]
    Abort,
    #[serde(rename = "rollback")]
    Rollback,
}

/// The leader's answer to a [`Forwarded`] command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The leader that carried it out.
    #[serde(rename = "leader")]
    pub leader: String,
    /// `Ok`: what the command returned (a deployment id; a rollback's kind and deployment);
    /// `Err`: the HTTP status the refusal maps to, and its message.
    #[serde(rename = "result")]
    pub result: Result<Done, (u16, String)>,
}

/// What a forwarded command returned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Done {
    #[serde(rename = "deployment", default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<u64>,
    #[serde(rename = "rollback", default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
    /// A rollback's word on the fleet (see `RollbackDone::fleet`).
    #[serde(rename = "fleet", default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
}

/// A forwarded command as the leader sees it.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub id: String,
    pub forwarded: Forwarded,
}

/// Why a forwarded command has no answer.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Fleet(#[from] FleetError),
    #[error(
        "the leader did not answer within {waited:?}{claimed}; the command may or may not have been carried \
         out: see `cutover status` and `cutover history`, then try again if needed"
    )]
    NoAnswer { waited: Duration, claimed: String },
}

impl Membership {
    fn relay_key(&self, kind: &str, id: &str) -> String {
        format!("{}/{kind}/{id}", self.prefix)
    }

    /// Sends `command` for `service` to the leader and waits at most `timeout` for its answer.
    pub async fn forward(
        &self,
        service: &str,
        actor: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<Answer, RelayError> {
        let id = crate::store::etcd::commit_nonce();
        let forwarded = Forwarded {
            from: self.node.clone(),
            actor: actor.to_string(),
            service: service.to_string(),
            command,
            lease: self.lease,
        };
        let value = serde_json::to_vec(&forwarded).map_err(|e| FleetError::Setup(e.to_string()))?;
        let (command_key, answer_key, claim_key) = (
            self.relay_key("commands", &id),
            self.relay_key("answers", &id),
            self.relay_key("claims", &id),
        );
        let put = retry(self.deadline(), || {
            let (mut client, key, value) = (self.client.clone(), command_key.clone(), value.clone());
            async move {
                client
                    .put(key, value, Some(PutOptions::new().with_lease(self.lease)))
                    .await
            }
        })
        .await
        .map_err(self.fail("sending the command to the leader"))?;
        let after = put.header().map_or(0, |h| h.revision());
        let t0 = Instant::now();
        let answer = tokio::time::timeout(timeout, self.await_answer(&answer_key, after)).await;
        // Whatever happened, the keys go (the command first: no leader takes it any more).
        let cleanup = Txn::new().and_then([
            TxnOp::delete(command_key.clone(), None),
            TxnOp::delete(answer_key.clone(), None),
            TxnOp::delete(claim_key.clone(), None),
        ]);
        let claimed = match &answer {
            Ok(Ok(_)) => String::new(),
            _ => match self.client.clone().get(claim_key.clone(), None).await {
                Ok(r) if !r.kvs().is_empty() => {
                    let by = r.kvs().first().and_then(|kv| kv.value_str().ok()).unwrap_or("?");
                    format!(" (node {by} took it)")
                }
                Ok(_) => " (no leader took it)".to_string(),
                Err(_) => String::new(),
            },
        };
        let _ = retry(self.deadline(), || {
            let (mut client, txn) = (self.client.clone(), cleanup.clone());
            async move { client.txn(txn).await }
        })
        .await;
        match answer {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(RelayError::NoAnswer {
                waited: t0.elapsed(),
                claimed,
            }),
        }
    }

    /// The answer at `key`, written after revision `after`: read, then watched.
    async fn await_answer(&self, key: &str, after: i64) -> Result<Answer, FleetError> {
        loop {
            let read = retry(self.deadline(), || {
                let (mut client, key) = (self.client.clone(), key.to_string());
                async move { client.get(key, None).await }
            })
            .await
            .map_err(self.fail("reading the leader's answer"))?;
            if let Some(kv) = read.kvs().first() {
                return serde_json::from_slice(kv.value())
                    .map_err(|e| FleetError::Setup(format!("the leader's answer cannot be read: {e}")));
            }
            let from = read.header().map_or(after, |h| h.revision()) + 1;
            let mut stream = match self
                .client
                .clone()
                .watch(key, Some(WatchOptions::new().with_start_revision(from)))
                .await
            {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            while let Ok(Some(resp)) = stream.message().await {
                for event in resp.events() {
                    if event.event_type() != EventType::Put {
                        continue;
                    }
                    if let Some(kv) = event.kv() {
                        return serde_json::from_slice(kv.value())
                            .map_err(|e| FleetError::Setup(format!("the leader's answer cannot be read: {e}")));
                    }
                }
                if resp.canceled() {
                    break;
                }
            }
            // The watch broke: read again.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The commands waiting now, and the revision of that read (to watch from).
    pub async fn pending_commands(&self) -> Result<(Vec<Incoming>, i64), FleetError> {
        let prefix = format!("{}/commands/", self.prefix);
        let read = self.get_prefix(&prefix, "reading the forwarded commands").await?;
        let at = read.header().map_or(0, |h| h.revision());
        let incoming = read
            .kvs()
            .iter()
            .filter_map(|kv| incoming(&prefix, kv.key(), kv.value()))
            .collect();
        Ok((incoming, at))
    }

    /// Sends each command put after revision `after` to `to` until the watch breaks; says why.
    pub async fn watch_commands(&self, after: i64, to: &tokio::sync::mpsc::UnboundedSender<Incoming>) -> FleetError {
        let prefix = format!("{}/commands/", self.prefix);
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1);
        let mut stream = match self.client.clone().watch(prefix.clone(), Some(options)).await {
            Ok(s) => s,
            Err(e) => return self.fail("watching the forwarded commands")(e),
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        return FleetError::Setup("etcd cancelled the watch of the forwarded commands".into());
                    }
                    for event in resp.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(kv) = event.kv() else { continue };
                        if let Some(c) = incoming(&prefix, kv.key(), kv.value()) {
                            if to.send(c).is_err() {
                                return FleetError::Setup("nobody takes the forwarded commands any more".into());
                            }
                        }
                    }
                }
                Ok(None) => return FleetError::Setup("etcd ended the watch of the forwarded commands".into()),
                Err(e) => return self.fail("watching the forwarded commands")(e),
            }
        }
    }

    /// Takes command `c` to carry it out: `false` if a leader took it already (this one or one
    /// before it). The claim lives under the sender's lease.
    pub async fn claim(&self, c: &Incoming) -> Result<bool, FleetError> {
        let key = self.relay_key("claims", &c.id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.node.clone(),
                Some(PutOptions::new().with_lease(c.forwarded.lease)),
            )]);
        let resp = retry(self.deadline(), || {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
        .map_err(self.fail("taking a forwarded command"))?;
        Ok(resp.succeeded())
    }

    /// Puts the answer to command `c` (under the sender's lease, like the command).
    pub async fn answer(&self, c: &Incoming, answer: &Answer) -> Result<(), FleetError> {
        let key = self.relay_key("answers", &c.id);
        let value = serde_json::to_vec(answer).map_err(|e| FleetError::Setup(e.to_string()))?;
        let lease = c.forwarded.lease;
        retry(self.deadline(), || {
            let (mut client, key, value) = (self.client.clone(), key.clone(), value.clone());
            async move { client.put(key, value, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await
        .map_err(self.fail("answering a forwarded command"))?;
        Ok(())
    }

    /// Publishes one of the leader's notices (JSON) for the other nodes.
    pub async fn publish_notice(&self, notice: Vec<u8>) -> Result<(), FleetError> {
        let key = self.relay_key("notices", &self.node);
        self.put_leased(key, notice, "publishing a notice").await
    }

    /// Sends each notice another node publishes from now on to `to` (the publisher's name and
    /// the notice), in order, until the watch breaks; says why.
    pub async fn watch_notices(&self, to: &tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>)>) -> FleetError {
        let prefix = format!("{}/notices/", self.prefix);
        let mut stream = match self
            .client
            .clone()
            .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
            .await
        {
            Ok(s) => s,
            Err(e) => return self.fail("watching the notices")(e),
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        return FleetError::Setup("etcd cancelled the watch of the notices".into());
                    }
                    for event in resp.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(kv) = event.kv() else { continue };
                        let Some(node) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                            continue;
                        };
                        if node != self.node && to.send((node.to_string(), kv.value().to_vec())).is_err() {
                            return FleetError::Setup("nobody takes the notices any more".into());
                        }
                    }
                }
                Ok(None) => return FleetError::Setup("etcd ended the watch of the notices".into()),
                Err(e) => return self.fail("watching the notices")(e),
            }
        }
    }
}

fn incoming(prefix: &str, key: &[u8], value: &[u8]) -> Option<Incoming> {
    let id = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?.to_string();
    match serde_json::from_slice(value) {
        Ok(forwarded) => Some(Incoming { id, forwarded }),
        Err(e) => {
            tracing::warn!(command = %id, error = %e, "a forwarded command cannot be read; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use etcd_client::GetOptions;

    use super::*;
    use crate::store::etcd::EtcdOptions;
    use crate::testing::etcd::EtcdCluster;

    const TTL: Duration = Duration::from_secs(2);

    /// A forwarded command reaches the leader, is taken once (a second leader, or the same one
    /// seeing it again, cannot take it), and its answer reaches the sender, who removes every key
    /// of it. A command nobody takes ends in a clear error at the timeout, naming that nobody
    /// took it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forwarded_command_is_taken_once_and_answered() {
        let cluster = tokio::task::spawn_blocking(EtcdCluster::start).await.unwrap();
        let mut o = EtcdOptions::new(cluster.endpoints());
        o.prefix = "/relay".into();
        o.timeout = Duration::from_secs(3);
        let leader = std::sync::Arc::new(Membership::join(&o, "leader", TTL).await.unwrap());
        let other = Membership::join(&o, "other", TTL).await.unwrap();
        let sender = Membership::join(&o, "sender", TTL).await.unwrap();

        // Nobody watches yet: the command waits, and ends unanswered.
        let e = sender
            .forward("web", "cli", Command::Promote, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("the leader did not answer") && e.to_string().contains("no leader took it"),
            "{e}"
        );
        let (waiting, at) = leader.pending_commands().await.unwrap();
        assert!(waiting.is_empty(), "the sender removed its command: {waiting:?}");

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watch = {
            let leader = leader.clone();
            tokio::spawn(async move { leader.watch_commands(at, &tx).await })
        };
        let sending = tokio::spawn(async move {
            let command = Command::Deploy {
                version: "v2".into(),
                upstreams: vec!["127.0.0.1:9".into()],
            };
            let answer = sender.forward("web", "cli", command, Duration::from_secs(10)).await;
            (sender, answer)
        });
        let c = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.forwarded.from, "sender");
        assert_eq!(c.forwarded.service, "web");
        assert_eq!(
            c.forwarded.command,
            Command::Deploy {
                version: "v2".into(),
                upstreams: vec!["127.0.0.1:9".into()]
            }
        );
        assert!(leader.claim(&c).await.unwrap(), "the first claim takes it");
        assert!(!other.claim(&c).await.unwrap(), "a second leader cannot take it");
        assert!(!leader.claim(&c).await.unwrap(), "nor the same one again");
        let answer = Answer {
            leader: "leader".into(),
            result: Ok(Done {
                deployment: Some(7),
                rollback: None,
                fleet: None,
            }),
        };
        leader.answer(&c, &answer).await.unwrap();
        let (sender, got) = sending.await.unwrap();
        assert_eq!(got.unwrap(), answer);

        // Refusals travel with their status.
        let refused = Answer {
            leader: "leader".into(),
            result: Err((409, "service web: deployment 3 is in progress".into())),
        };
        let sending = tokio::spawn(async move {
            let answer = sender
                .forward("web", "cli", Command::Abort, Duration::from_secs(10))
                .await;
            (sender, answer)
        });
        let c = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(leader.claim(&c).await.unwrap());
        leader.answer(&c, &refused).await.unwrap();
        let (sender, got) = sending.await.unwrap();
        assert_eq!(got.unwrap(), refused);

        // Nothing is left behind.
        let mut client = sender.client.clone();
        let left = client
            .get("/relay/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok().map(str::to_string))
            .filter(|k| !k.starts_with("/relay/nodes/"))
            .collect::<Vec<_>>();
        assert!(left.is_empty(), "{left:?}");
        watch.abort();
    }
}
