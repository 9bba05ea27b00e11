//! Proves that the MongoDB-wire test server does what labsync needs of
//! MongoDB: a unique compound index that refuses duplicates with E11000, a
//! bulk upsert, and a `delete_many` with `$in`.

use labsync_test_support::test_database;
use mongodb::IndexModel;
use mongodb::bson::{Document, doc};
use mongodb::options::{IndexOptions, UpdateOneModel};

const DUPLICATE_KEY: i32 = 11000;

fn write_error_code(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => {
            Some(w.code)
        }
        _ => None,
    }
}

#[tokio::test]
async fn unique_index_refuses_a_second_worker_lab_pair_with_e11000() {
    let db = test_database().await;
    let labs = db.collection::<Document>("labs");
    labs.create_index(
        IndexModel::builder()
            .keys(doc! {"worker_id": 1, "lab_id": 1})
            .options(IndexOptions::builder().unique(true).build())
            .build(),
    )
    .await
    .expect("create unique index");
    let lab = doc! {"worker_id": "cml-1", "lab_id": "a6a334de-b497-47ae-bbff-44a83f890114"};
    labs.insert_one(lab.clone()).await.expect("first insert");
    let err = labs
        .insert_one(lab.clone())
        .await
        .expect_err("duplicate must fail");
    assert_eq!(write_error_code(&err), Some(DUPLICATE_KEY), "{err}");
    // The same lab id on another worker is a different record.
    labs.insert_one(doc! {"worker_id": "cml-2", "lab_id": "a6a334de-b497-47ae-bbff-44a83f890114"})
        .await
        .expect("same lab id, other worker");
    assert_eq!(labs.count_documents(doc! {}).await.unwrap(), 2);
}

#[tokio::test]
async fn bulk_upsert_creates_then_updates_in_one_call() {
    let db = test_database().await;
    let labs = db.collection::<Document>("labs");
    let ids: Vec<String> = (0..50).map(|i| format!("lab-{i:03}")).collect();
    let models = |title: &str| {
        ids.iter()
            .map(|id| {
                UpdateOneModel::builder()
                    .namespace(labs.namespace())
                    .filter(doc! {"worker_id": "cml-1", "lab_id": id})
                    .update(doc! {"$set": {"title": title}})
                    .upsert(true)
                    .build()
            })
            .collect::<Vec<_>>()
    };
    let client = db.client();
    let created = client
        .bulk_write(models("first"))
        .await
        .expect("bulk upsert");
    assert_eq!(created.upserted_count, 50);
    let updated = client
        .bulk_write(models("second"))
        .await
        .expect("bulk update");
    assert_eq!((updated.upserted_count, updated.modified_count), (0, 50));
    assert_eq!(
        labs.count_documents(doc! {"title": "second"})
            .await
            .unwrap(),
        50
    );
}

#[tokio::test]
async fn delete_many_with_in_removes_exactly_the_listed_records() {
    let db = test_database().await;
    let labs = db.collection::<Document>("labs");
    let docs: Vec<Document> = (0..200)
        .map(|i| doc! {"worker_id": "cml-1", "lab_id": format!("lab-{i:03}")})
        .collect();
    labs.insert_many(docs).await.expect("insert");
    let doomed: Vec<String> = (0..200).step_by(2).map(|i| format!("lab-{i:03}")).collect();
    let result = labs
        .delete_many(doc! {"worker_id": "cml-1", "lab_id": {"$in": &doomed}})
        .await
        .expect("delete_many");
    assert_eq!(result.deleted_count, 100);
    assert_eq!(labs.count_documents(doc! {}).await.unwrap(), 100);
    assert_eq!(
        labs.count_documents(doc! {"lab_id": {"$in": &doomed}})
            .await
            .unwrap(),
        0
    );
}
