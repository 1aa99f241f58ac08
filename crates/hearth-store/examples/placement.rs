//! Placement time at fleet scale (BENCHMARKS.md): `cargo run --release -p hearth-store
//! --features testing --example placement -- [HOSTS] [SAMPLES]`, on SQLite and, when
//! `HEARTH_TEST_POSTGRES_URL` is set, on PostgreSQL. The fleet is filled unevenly (each
//! host between empty and nearly full) so the query has real choices to make.

use hearth_core::{HostKind, Resources, Role, Tier};
use hearth_store::{HostCapacity, NewHost, Placement, Store};
use std::time::Duration;

async fn run(label: &str, store: Store, hosts: usize, samples: usize) {
    let mut ids = Vec::new();
    for i in 0..hosts {
        let host = NewHost {
            id: uuid::Uuid::now_v7().to_string(),
            name: format!("h{i:05}"),
            kind: HostKind::Sim,
            endpoint: format!("sim://h{i}"),
            guest_address: "127.0.0.1".into(),
            region: Some(["gra", "sbg", "bhs"][i % 3].into()),
            gpu_model: None,
            gpu_count: 0,
            capacity: HostCapacity {
                max_vcpus: 64,
                max_memory_mb: 65536,
                max_environments: 50,
            },
            tls_ca: None,
            tls_cert: None,
            tls_key_sealed: None,
            credential_sealed: None,
            options: serde_json::json!({}),
            identity: None,
        };
        ids.push(store.add_host(&host).await.unwrap().id);
    }
    let (user, _) = store
        .create_user("bench@example.com", Role::User, Tier::Unlimited)
        .await
        .unwrap();
    let fill: Vec<(String, i64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), ((i * 37) % 50) as i64))
        .collect();
    store
        .insert_running_for_tests(&user.id, &fill)
        .await
        .unwrap();
    let need = |region: Option<&str>| Placement {
        kind: HostKind::Sim,
        resources: Resources {
            vcpus: 1,
            memory_mb: 256,
            disk_gb: 1,
        },
        gpus: 0,
        gpu_model: None,
        region: region.map(str::to_string),
    };
    // The floor, in the same run: one host read by primary key.
    let mut floor: Vec<Duration> = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = std::time::Instant::now();
        store.host(&ids[i % ids.len()]).await.unwrap();
        floor.push(started.elapsed());
    }
    floor.sort();
    let floor_p50 = floor[floor.len() / 2].as_secs_f64() * 1000.0;
    println!(
        "{label:<10} one host by primary key (floor): p50 {floor_p50:.2} ms, p99 {:.2} ms",
        floor[floor.len() * 99 / 100].as_secs_f64() * 1000.0
    );
    for (what, region) in [("any region", None), ("region gra", Some("gra"))] {
        let mut times: Vec<Duration> = Vec::with_capacity(samples);
        for _ in 0..samples {
            times.push(store.time_placement(&need(region)).await.unwrap());
        }
        times.sort();
        let pct = |p: f64| {
            times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_secs_f64() * 1000.0
        };
        println!(
            "{label:<10} {hosts} hosts, {what:<10}: placement p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={samples}); p50 / floor {:.1}",
            pct(0.5),
            pct(0.99),
            pct(1.0),
            pct(0.5) / floor_p50
        );
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let hosts: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(1000);
    let samples: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("p.db").display());
    run(
        "SQLite",
        Store::connect(&url).await.unwrap(),
        hosts,
        samples,
    )
    .await;
    if std::env::var("HEARTH_TEST_POSTGRES_URL").is_ok() {
        run(
            "PostgreSQL",
            hearth_store::testdb::fresh_postgres().await,
            hosts,
            samples,
        )
        .await;
    }
}
