//! [`Health`] on MongoDB: a `ping`.

use std::time::Duration;

use async_trait::async_trait;
use labsync_application::ports::Health;
use mongodb::Database;
use mongodb::bson::doc;

#[derive(Debug, Clone)]
pub struct MongoHealth {
    db: Database,
}

impl MongoHealth {
    pub fn new(db: &Database) -> Self {
        Self { db: db.clone() }
    }
}

#[async_trait]
impl Health for MongoHealth {
    async fn store_answers(&self, timeout: Duration) -> bool {
        let db = self.db.clone();
        // In its own task: a timeout here leaves the ping to finish (or
        // fail) there, never half done in the driver.
        let ping = tokio::spawn(async move { db.run_command(doc! {"ping": 1}).await.is_ok() });
        matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(true)))
    }
}
