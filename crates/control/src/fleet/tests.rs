//! Membership, leadership and acknowledgements against a real 3-member etcd cluster.

use super::*;
use crate::testing::etcd::EtcdCluster;

fn options(cluster: &EtcdCluster, prefix: &str) -> EtcdOptions {
    let mut options = EtcdOptions::new(cluster.endpoints());
    options.prefix = prefix.to_string();
    options.timeout = Duration::from_secs(3);
    options
}

const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_register_under_their_lease_and_a_name_is_taken_once() {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::start).await.unwrap();
    let o = options(&cluster, "/fleet-a");
    let a = Membership::join(&o, "a", TTL).await.unwrap();
    let b = Membership::join(&o, "b", TTL).await.unwrap();
    assert_eq!(a.members().await.unwrap(), ["a", "b"]);

    // A second "a" while the first lives: refused after waiting out twice a lease's life.
    let started = Instant::now();
    let e = Membership::join(&o, "a", TTL).await.err().expect("refused");
    assert!(matches!(e, FleetError::NameTaken { .. }), "{e}");
    assert!(e.to_string().contains("give each node its own name"), "{e}");
    assert!(
        started.elapsed() < TTL * 2 + Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // b leaves: gone at once. a crashes (stops keeping its lease): gone within the lease's
    // life, and its name is free again.
    b.leave().await.unwrap();
    let c = Membership::join(&o, "c", TTL).await.unwrap();
    assert_eq!(c.members().await.unwrap(), ["a", "c"]);
    a.abandon();
    let gone_by = Instant::now() + TTL + Duration::from_secs(3);
    while c.members().await.unwrap().contains(&"a".to_string()) {
        assert!(
            Instant::now() < gone_by,
            "a crashed node stays registered past its lease"
        );
        tokio::time::sleep(POLL).await;
    }
    let again = Membership::join(&o, "a", TTL).await.unwrap();
    assert_eq!(again.members().await.unwrap(), ["a", "c"]);
    assert!(matches!(
        Membership::join(&o, "x/y", TTL).await.err(),
        Some(FleetError::Setup(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_leads_and_another_takes_over_when_it_dies() {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::start).await.unwrap();
    let o = options(&cluster, "/fleet-b");
    let a = Membership::join(&o, "a", TTL).await.unwrap();
    let b = Membership::join(&o, "b", TTL).await.unwrap();
    assert!(a.try_lead().await.unwrap());
    assert!(a.try_lead().await.unwrap(), "a leader campaigning again still leads");
    assert!(!b.try_lead().await.unwrap(), "two leaders");
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("a"));

    // The leader crashes: b leads within the lease's life, not before a's lease is gone.
    let campaign = tokio::spawn(async move {
        b.campaign().await.unwrap();
        b
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!campaign.is_finished(), "b led while a was alive");
    let crashed = Instant::now();
    a.abandon();
    let b = tokio::time::timeout(TTL + Duration::from_secs(3), campaign)
        .await
        .expect("b leads within the lease's life")
        .unwrap();
    assert!(
        crashed.elapsed() <= TTL + Duration::from_secs(2),
        "{:?}",
        crashed.elapsed()
    );
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("b"));

    // A leader that leaves hands over at once.
    let c = Membership::join(&o, "c", TTL).await.unwrap();
    b.leave().await.unwrap();
    let handed = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), c.campaign())
        .await
        .expect("c leads at once after b left")
        .unwrap();
    assert!(handed.elapsed() < Duration::from_secs(1), "{:?}", handed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_counts_as_applied_when_every_member_acknowledged_it() {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::start).await.unwrap();
    let o = options(&cluster, "/fleet-c");
    let a = Membership::join(&o, "a", TTL).await.unwrap();
    let b = Membership::join(&o, "b", TTL).await.unwrap();
    let c = Membership::join(&o, "c", TTL).await.unwrap();

    a.acknowledge("web", 7).await.unwrap();
    b.acknowledge("web", 8).await.unwrap();
    // c has not: named after the wait, which lasts its time.
    let started = Instant::now();
    let wait = a.wait_for_acks("web", 7, Duration::from_millis(400)).await.unwrap();
    assert_eq!(wait.acked, ["a", "b"]);
    assert_eq!(wait.missing, ["c"]);
    assert!(started.elapsed() >= Duration::from_millis(400));
    // An acknowledgement of an older revision does not count.
    c.acknowledge("web", 6).await.unwrap();
    let wait = a.wait_for_acks("web", 7, Duration::from_millis(200)).await.unwrap();
    assert_eq!(wait.missing, ["c"]);
    // Another service's acknowledgements are apart.
    c.acknowledge("api", 7).await.unwrap();
    assert_eq!(
        a.wait_for_acks("web", 7, Duration::from_millis(100))
            .await
            .unwrap()
            .missing,
        ["c"]
    );

    // c acknowledges while a waits: the wait ends then, not at its deadline.
    let waiting = {
        let o = o.clone();
        tokio::spawn(async move {
            let watcher = Membership::join(&o, "watcher", TTL).await.unwrap();
            watcher.acknowledge("web", 7).await.unwrap();
            let started = Instant::now();
            let wait = watcher.wait_for_acks("web", 7, Duration::from_secs(10)).await.unwrap();
            (wait, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.acknowledge("web", 7).await.unwrap();
    let (wait, took) = waiting.await.unwrap();
    assert!(wait.missing.is_empty(), "{wait:?}");
    assert_eq!(wait.acked, ["a", "b", "c", "watcher"]);
    assert!(took < Duration::from_secs(3), "{took:?}");

    // A member that crashed is no longer waited for once its lease is gone, and its
    // acknowledgements go with it.
    c.abandon();
    tokio::time::sleep(TTL + Duration::from_secs(2)).await;
    a.acknowledge("web", 9).await.unwrap();
    b.acknowledge("web", 9).await.unwrap();
    let wait = a.wait_for_acks("web", 9, Duration::from_millis(100)).await.unwrap();
    assert_eq!(wait.acked, ["a", "b"]);
    assert_eq!(wait.missing, Vec::<String>::new());
    assert!(!a.acks("web").await.unwrap().contains_key("c"));
}

/// The wait follows etcd as it changes, each change taken when etcd has it, not at the next full
/// read ([`RECHECK`]): an acknowledgement ends it, a member that leaves is no longer waited for,
/// a member that joins is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_takes_acknowledgements_and_members_as_etcd_has_them() {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::start).await.unwrap();
    let o = options(&cluster, "/fleet-d");
    let a = std::sync::Arc::new(Membership::join(&o, "a", TTL).await.unwrap());
    let b = Membership::join(&o, "b", TTL).await.unwrap();
    let c = Membership::join(&o, "c", TTL).await.unwrap();
    let soon = RECHECK / 2;
    let wait = |revision: u64| {
        let a = a.clone();
        tokio::spawn(async move {
            let wait = a.wait_for_acks("web", revision, Duration::from_secs(10)).await.unwrap();
            (wait, Instant::now())
        })
    };

    // An acknowledgement ends the wait.
    a.acknowledge("web", 5).await.unwrap();
    b.acknowledge("web", 5).await.unwrap();
    let waiting = wait(5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    c.acknowledge("web", 5).await.unwrap();
    let acked = Instant::now();
    let (w, ended) = waiting.await.unwrap();
    assert_eq!((w.acked, w.missing), (vec!["a".into(), "b".into(), "c".into()], vec![]));
    assert!(ended.duration_since(acked) < soon, "{:?}", ended.duration_since(acked));

    // A member that leaves is no longer waited for.
    a.acknowledge("web", 6).await.unwrap();
    b.acknowledge("web", 6).await.unwrap();
    let waiting = wait(6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    c.leave().await.unwrap();
    let left = Instant::now();
    let (w, ended) = waiting.await.unwrap();
    assert_eq!((w.acked, w.missing), (vec!["a".into(), "b".into()], vec![]));
    assert!(ended.duration_since(left) < soon, "{:?}", ended.duration_since(left));

    // A member that joins is waited for.
    a.acknowledge("web", 7).await.unwrap();
    let waiting = wait(7);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = Membership::join(&o, "d", TTL).await.unwrap();
    b.acknowledge("web", 7).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the wait ended without the member that joined");
    d.acknowledge("web", 7).await.unwrap();
    let acked = Instant::now();
    let (w, ended) = waiting.await.unwrap();
    assert_eq!((w.acked, w.missing), (vec!["a".into(), "b".into(), "d".into()], vec![]));
    assert!(ended.duration_since(acked) < soon, "{:?}", ended.duration_since(acked));
}

/// A node that crashed and starts again at once waits for its old registration to expire, then
/// joins: the lease it joins under is granted once the name is free, so it does not expire during
/// the wait (one granted before the wait did, and the join failed with "requested lease not
/// found").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_again_right_after_a_crash_joins() {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::start).await.unwrap();
    let o = options(&cluster, "/fleet-restart");
    for round in 0..2 {
        // The crashed daemon's lease lives longer than the one the new daemon asks for (a
        // lease_ttl changed between the two, or etcd's expiry rounds): the wait outlasts it.
        let a = Membership::join(&o, "a", Duration::from_secs(4)).await.unwrap();
        a.abandon();
        let started = Instant::now();
        let again = Membership::join(&o, "a", TTL)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            started.elapsed() <= TTL * 2 + Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(again.members().await.unwrap(), ["a"]);
        tokio::time::sleep(TTL + Duration::from_secs(1)).await;
        assert_eq!(
            again.members().await.unwrap(),
            ["a"],
            "round {round}: the new registration lives"
        );
        again.leave().await.unwrap();
    }
}
