//! Deterministic demo data: the same seed gives the same users and labs, ids
//! and timestamps included, on every machine.

use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{Lab, LabGroup, SimUser, timestamp};

const TOPICS: [&str; 12] = [
    "OSPF multi-area",
    "BGP route reflectors",
    "EIGRP stub routing",
    "VLAN trunking",
    "IOSv feature tests",
    "NX-OS VXLAN EVPN",
    "DMVPN phase 3",
    "QoS policing",
    "IPv6 migration",
    "MPLS L3VPN",
    "HSRP failover",
    "NAT and ACLs",
];

const NOTES: [&str; 3] = [
    "",
    "Some _markdown_ notes for the lab.",
    "# Lab guide\n\n## Tasks\n\n- Bring up the core links\n- Verify adjacency with `show ip ospf neighbor`\n- Break one link and watch convergence\n\n## Reset\n\nWipe the lab before handing it back.",
];

/// A random UUID4 drawn from `rng`, so that seeded ids are reproducible.
pub fn uuid4(rng: &mut impl Rng) -> String {
    let bytes: [u8; 16] = rng.random();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

pub fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// The group non-admin users belong to.
pub fn students_group(seed: u64) -> LabGroup {
    let mut rng = rng_for(seed, u64::MAX);
    LabGroup {
        id: uuid4(&mut rng),
        permission: "read_only".into(),
        name: Some("Students".into()),
    }
}

/// An admin and a non-admin user. Passwords are the simulator's own, not
/// secrets of any real system.
pub fn users(seed: u64, admin_password: &str, user_password: &str) -> Vec<SimUser> {
    let mut rng = rng_for(seed, u64::MAX - 1);
    vec![
        SimUser {
            id: uuid4(&mut rng),
            username: "admin".into(),
            password: admin_password.into(),
            fullname: String::new(),
            admin: true,
            groups: vec![],
        },
        SimUser {
            id: uuid4(&mut rng),
            username: "student".into(),
            password: user_password.into(),
            fullname: "Lab Student".into(),
            admin: false,
            groups: vec![students_group(seed).id],
        },
    ]
}

fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 6, 9, 0, 0)
        .single()
        .unwrap_or_default()
}

/// `count` labs for the worker with index `worker`, owned by `users`.
pub fn labs(seed: u64, worker: u64, count: usize, users: &[SimUser]) -> Vec<Lab> {
    let mut rng = rng_for(seed, worker);
    let group = students_group(seed);
    (0..count)
        .map(|n| {
            let owner = &users[rng.random_range(0..users.len())];
            let created = epoch() + ChronoDuration::seconds(rng.random_range(0..30_000_000));
            let modified = created + ChronoDuration::seconds(rng.random_range(0..3_000_000));
            let state = match rng.random_range(0..4) {
                0 | 1 => "DEFINED_ON_CORE",
                2 => "STOPPED",
                _ => "STARTED",
            };
            let node_count = rng.random_range(0..=24);
            let link_count = if node_count == 0 {
                0
            } else {
                rng.random_range(node_count - 1..=node_count + node_count / 2)
            };
            let shared = rng.random_bool(0.25);
            Lab {
                id: uuid4(&mut rng),
                created: timestamp(created),
                modified: timestamp(modified),
                lab_description: format!("{} practice topology", TOPICS[n % TOPICS.len()]),
                lab_notes: NOTES[rng.random_range(0..NOTES.len())].into(),
                lab_title: format!("{} #{}", TOPICS[n % TOPICS.len()], n + 1),
                owner: owner.id.clone(),
                owner_username: owner.username.clone(),
                owner_fullname: owner.fullname.clone(),
                state: state.into(),
                node_count,
                link_count,
                groups: if shared { vec![group.clone()] } else { vec![] },
                pending: None,
            }
        })
        .collect()
}
