//! Sharing partitions out between the running instances of a pipeline (pure, unit-tested).
//!
//! Every instance writes a heartbeat and renews the ownership of the partitions it holds every
//! balance interval. An ownership is *active* while its owner is set and its last renewal is
//! younger than the ownership expiry; a partition without an active owner is *claimable*.
//! The instances counted are the active owners plus every instance with a fresh heartbeat (so
//! that one that owns nothing yet is counted). With `P` partitions and `O` instances each
//! should hold `floor(P/O)` or `ceil(P/O)`:
//!
//! - an instance below `ceil` claims claimable partitions (never one with an active owner:
//!   taking a partition from a live reader would read its uncommitted events twice);
//! - an instance above `ceil`, or above `floor` while another is below `floor`, gives one
//!   partition up cooperatively (stop reading, let the next checkpoint cover what it read,
//!   write the partition's checkpoint with its state, release the ownership); only the instance
//!   with the most partitions (ties: the greatest id) does so in one round, so that two do not
//!   give up partitions for one newcomer.
//!
//! A crashed instance's partitions become claimable once its ownerships expire.

use std::collections::{BTreeMap, BTreeSet};

use super::store::OwnershipRecord;

/// What the store shows, and what this instance holds.
pub struct View<'a> {
    /// Every partition id of the hub.
    pub partitions: &'a [String],
    pub ownerships: &'a [OwnershipRecord],
    /// Heartbeats: (instance, last heartbeat in ms).
    pub instances: &'a [(String, i64)],
    pub me: &'a str,
    /// Partitions this instance holds (reading or being given up).
    pub held: &'a BTreeSet<String>,
    /// Partitions this instance is giving up already.
    pub releasing: &'a BTreeSet<String>,
    pub now_ms: i64,
    pub expiry_ms: i64,
}

/// What to do this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Partitions to claim, with the version to claim over (`None`: no ownership exists yet).
    pub claim: Vec<(String, Option<String>)>,
    /// Partitions to give up.
    pub release: Vec<String>,
    /// Instances counted (including this one).
    pub instances: usize,
}

impl View<'_> {
    fn active(&self, o: &OwnershipRecord) -> bool {
        !o.owner.is_empty() && self.now_ms - o.modified_ms <= self.expiry_ms
    }
}

/// Decides one round.
pub fn decide(v: &View<'_>) -> Decision {
    let by_partition: BTreeMap<&str, &OwnershipRecord> =
        v.ownerships.iter().map(|o| (o.partition.as_str(), o)).collect();
    // partitions held by others (active), per owner
    let mut others: BTreeMap<&str, usize> = BTreeMap::new();
    let mut claimable: Vec<(String, Option<String>)> = Vec::new();
    for p in v.partitions {
        if v.held.contains(p) {
            continue;
        }
        match by_partition.get(p.as_str()) {
            Some(o) if v.active(o) && o.owner != v.me => *others.entry(o.owner.as_str()).or_default() += 1,
            Some(o) => claimable.push((p.clone(), Some(o.etag.clone()))),
            None => claimable.push((p.clone(), None)),
        }
    }
    // this instance's own ownerships first (left from before a restart), then released, then expired
    claimable.sort_by_key(|(p, _)| match by_partition.get(p.as_str()) {
        Some(o) if o.owner == v.me => 0,
        None => 1,
        Some(o) if o.owner.is_empty() => 1,
        Some(_) => 2,
    });
    let mut owners: BTreeSet<&str> = others.keys().copied().collect();
    for (i, seen) in v.instances {
        if v.now_ms - seen <= v.expiry_ms {
            owners.insert(i.as_str());
        }
    }
    owners.insert(v.me);
    let count = owners.len();
    let total = v.partitions.len();
    let floor = total / count;
    let ceil = total.div_ceil(count);
    let mine = v.held.len() - v.releasing.len().min(v.held.len());
    let mut d = Decision { instances: count, ..Default::default() };

    if mine < ceil {
        d.claim = claimable.into_iter().take(ceil - mine).collect();
        return d;
    }
    // give one up when over the fair share and this instance holds the most
    let starved = owners.iter().any(|o| *o != v.me && others.get(o).copied().unwrap_or(0) < floor);
    let over = mine > ceil || (mine > floor && starved);
    if over && v.releasing.is_empty() {
        let most = others.iter().map(|(o, n)| (*n, *o)).max();
        let i_am_first = match most {
            Some((n, o)) => (mine, v.me) > (n, o),
            None => true,
        };
        if i_am_first {
            if let Some(p) = v.held.iter().filter(|p| !v.releasing.contains(*p)).max_by(|a, b| order(a, b)) {
                d.release.push(p.clone());
            }
        }
    }
    d
}

/// Numeric partition ids in numeric order.
pub fn order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY: i64 = 60_000;
    const NOW: i64 = 1_000_000;

    fn own(p: &str, owner: &str, age_ms: i64) -> OwnershipRecord {
        OwnershipRecord { partition: p.into(), owner: owner.into(), etag: format!("e{p}"), modified_ms: NOW - age_ms }
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn parts(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    /// (claimed partitions, released partitions, instances)
    fn check(
        n: usize,
        ownerships: &[OwnershipRecord],
        instances: &[(&str, i64)],
        held: &[&str],
        releasing: &[&str],
    ) -> (Vec<String>, Vec<String>, usize) {
        let partitions = parts(n);
        let instances: Vec<(String, i64)> = instances.iter().map(|(i, age)| (i.to_string(), NOW - age)).collect();
        let (held, releasing) = (set(held), set(releasing));
        let d = decide(&View {
            partitions: &partitions,
            ownerships,
            instances: &instances,
            me: "me",
            held: &held,
            releasing: &releasing,
            now_ms: NOW,
            expiry_ms: EXPIRY,
        });
        (d.claim.into_iter().map(|c| c.0).collect(), d.release, d.instances)
    }

    #[test]
    fn alone_claims_everything() {
        assert_eq!(check(4, &[], &[], &[], &[]), (set(&["0", "1", "2", "3"]).into_iter().collect(), vec![], 1));
    }

    #[test]
    fn claims_only_up_to_the_fair_share_and_never_from_a_live_owner() {
        let o = [own("0", "b", 1000), own("1", "b", 1000)];
        let (claim, release, n) = check(4, &o, &[("b", 500)], &[], &[]);
        assert_eq!((claim, release, n), (vec!["2".to_string(), "3".to_string()], vec![], 2));
        // b holds three: only the one left over is claimable, b gives one up by itself
        let o = [own("0", "b", 10), own("1", "b", 10), own("2", "b", 10)];
        assert_eq!(check(4, &o, &[], &[], &[]).0, vec!["3".to_string()]);
    }

    #[test]
    fn expired_and_released_ownerships_are_claimable_with_their_etag() {
        let o = [own("0", "dead", EXPIRY + 1), own("1", "", 10)];
        let partitions = parts(2);
        let held = BTreeSet::new();
        let d = decide(&View {
            partitions: &partitions,
            ownerships: &o,
            instances: &[],
            me: "me",
            held: &held,
            releasing: &held,
            now_ms: NOW,
            expiry_ms: EXPIRY,
        });
        // released before expired
        assert_eq!(d.claim, vec![("1".to_string(), Some("e1".to_string())), ("0".to_string(), Some("e0".to_string()))]);
        assert_eq!(d.instances, 1, "the dead owner is not counted");
    }

    #[test]
    fn a_newcomer_without_partitions_makes_the_holder_give_one_up() {
        let o: Vec<_> = (0..4).map(|i| own(&i.to_string(), "me", 10)).collect();
        let (claim, release, n) = check(4, &o, &[("new", 100)], &["0", "1", "2", "3"], &[]);
        assert_eq!((claim.len(), release, n), (0, vec!["3".to_string()], 2));
        // one at a time
        let (_, release, _) = check(4, &o, &[("new", 100)], &["0", "1", "2", "3"], &["3"]);
        assert!(release.is_empty());
        // a stale heartbeat is not an instance
        let (_, release, n) = check(4, &o, &[("gone", EXPIRY + 5)], &["0", "1", "2", "3"], &[]);
        assert_eq!((release.len(), n), (0, 1));
    }

    #[test]
    fn only_the_instance_with_the_most_gives_up() {
        // 5 partitions, three instances: me 2, b 2, c 1 -> balanced (floor 1, ceil 2)
        let o = [own("0", "me", 1), own("1", "me", 1), own("2", "b", 1), own("3", "b", 1), own("4", "c", 1)];
        assert_eq!(check(5, &o, &[], &["0", "1"], &[]), (vec![], vec![], 3));
        // 4 partitions: me 2, b 2, c 0 -> one of us gives up: the greater id ("me" > "b")
        let o = [own("0", "me", 1), own("1", "me", 1), own("2", "b", 1), own("3", "b", 1)];
        assert_eq!(check(4, &o, &[("c", 1)], &["0", "1"], &[]).1, vec!["1".to_string()]);
        let o = [own("0", "me", 1), own("1", "me", 1), own("2", "zz", 1), own("3", "zz", 1)];
        assert!(check(4, &o, &[("c", 1)], &["0", "1"], &[]).1.is_empty());
    }

    #[test]
    fn balanced_states_are_stable() {
        for (n, k) in [(4usize, 2usize), (4, 3), (8, 3), (32, 5), (3, 4)] {
            // simulate k instances reaching a fixed point
            let ids: Vec<String> = (0..k).map(|i| format!("i{i}")).collect();
            let mut held: Vec<BTreeSet<String>> = vec![BTreeSet::new(); k];
            for _round in 0..200 {
                for me in 0..k {
                    let ownerships: Vec<OwnershipRecord> = held
                        .iter()
                        .enumerate()
                        .flat_map(|(j, h)| {
                            let id = &ids[j];
                            h.iter().map(move |p| own(p, id, 1))
                        })
                        .collect();
                    let instances: Vec<(String, i64)> = ids.iter().map(|i| (i.clone(), NOW)).collect();
                    let partitions = parts(n);
                    let releasing = BTreeSet::new();
                    let d = decide(&View {
                        partitions: &partitions,
                        ownerships: &ownerships,
                        instances: &instances,
                        me: &ids[me],
                        held: &held[me],
                        releasing: &releasing,
                        now_ms: NOW,
                        expiry_ms: EXPIRY,
                    });
                    for (p, _) in d.claim {
                        held[me].insert(p);
                    }
                    for p in d.release {
                        held[me].remove(&p);
                    }
                }
            }
            let counts: Vec<usize> = held.iter().map(|h| h.len()).collect();
            assert_eq!(counts.iter().sum::<usize>(), n, "{n} over {k}: {counts:?}");
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(hi - lo <= 1, "{n} over {k}: {counts:?}");
        }
    }
}
