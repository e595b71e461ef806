//! Redis Cluster (issue #16): every key of a deployment shares its hash tag, so the deployment
//! lives in one slot of a cluster. The sidecar finds that slot's master through the nodes it is
//! given (`--redis-cluster-nodes`) and follows a failover of it without a restart; events during
//! it answer 503 and are accepted once the promoted replica serves the slot, and no user's count
//! is wrong afterwards (the promoted replica does not vouch for the state, so what it lacks is
//! rebuilt from the Notification table, as after a restart). Spreading one deployment over the
//! masters is not built (docs/scaling.md, *Redis Cluster*).

use support::cluster::ClusterSetup;
use support::sidecar::{Sidecar, SidecarOptions};
use support::TestEnv;

use super::sentinel::rounds_across_a_failover;

/// How the slot's master goes away.
#[derive(Debug, Clone, Copy)]
enum Failover {
    /// SIGKILL: the other masters promote its replica a second later.
    MasterKilled,
    /// `CLUSTER FAILOVER` on the replica: the old master, still running, becomes its replica and
    /// answers `MOVED` for the slot.
    Requested,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_runs_in_its_slot_and_follows_a_failover_of_its_master() {
    failover_under_load(Failover::MasterKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_failover_is_followed_away_from_the_demoted_master() {
    failover_under_load(Failover::Requested).await;
}

/// Events in rounds, a flush, the failover between two rounds with deltas pending, more rounds
/// (retried through the 503s), and every user's count read and stored checked.
async fn failover_under_load(failover: Failover) {
    let seed: u64 = rand::random();
    println!("{failover:?}: seed {seed}");
    let env = TestEnv::postgres_with_source().await;
    let mut cluster = ClusterSetup::start();
    let hash_tag = format!("{{{}}}", env.core.redis_prefix);
    let first_master = cluster.master_of(&hash_tag).expect("a master serves the deployment's slot");
    let options = SidecarOptions {
        flush_cron: "off".into(),
        // Nothing listens there: the master can only be found through the cluster's nodes.
        redis_url: Some("redis://127.0.0.1:1".into()),
        serve_args: vec!["--redis-cluster-nodes".into(), cluster.addresses()],
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(&env, options).await;
    let keys_on = |port: u16| -> usize {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{hash_tag}*")).query(&mut conn).unwrap();
        keys.len()
    };
    let mut promoted = None;
    rounds_across_a_failover(&env, &sidecar, seed, async || {
        assert!(keys_on(first_master) > 0, "the deployment's keys are on its slot's master");
        match failover {
            Failover::MasterKilled => cluster.kill(first_master),
            Failover::Requested => {
                cluster.request_failover(first_master);
            }
        }
        promoted = Some(cluster.wait_for_failover(&hash_tag, first_master));
    })
    .await;
    let promoted = promoted.expect("the failover ran");
    assert!(keys_on(promoted) > 0, "the deployment's keys are on the promoted master");
}
