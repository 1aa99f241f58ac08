//! Runs a test body against a fresh SQLite file and a fresh PostgreSQL database.

use crate::Store;
use std::future::Future;

/// Where the test PostgreSQL server is; `make test` sets it. Tests refuse to pass
/// silently on one backend only.
pub fn postgres_admin_url() -> String {
    std::env::var("HEARTH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("HEARTH_TEST_POSTGRES_URL is not set: run the tests with `make test`, which starts PostgreSQL")
    })
}

/// A new, empty PostgreSQL database; returns its URL.
pub async fn fresh_postgres_url() -> String {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let admin = postgres_admin_url();
    let name = format!("hearth_t_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::AnyPool::connect(&admin).await.expect("connect to test PostgreSQL");
    pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

pub async fn fresh_postgres() -> Store {
    Store::connect(&fresh_postgres_url().await).await.unwrap()
}

/// Runs `body` with the URL of a fresh SQLite database, then of a fresh PostgreSQL one.
pub async fn each_backend_url<F, Fut>(body: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    body(format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display())).await;
    body(fresh_postgres_url().await).await;
}

pub async fn each_backend<F, Fut>(body: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    body(Store::connect(&url).await.unwrap()).await;
    body(fresh_postgres().await).await;
}
