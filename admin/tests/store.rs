//! One behavioural body for every control-plane store: SQLite (a file) and
//! PostgreSQL (a real server the test starts on 127.0.0.1; needs root to
//! run it as the `postgres` user, and Debian's `postgresql`).

use std::time::Duration;

use clawgress_admin::store::{Commit, Event, StoreError};
use clawgress_admin::{PgStore, Role, SqliteStore, Store};

async fn exercise(s: &dyn Store) {
    assert_eq!(s.candidate().await.expect("candidate"), None);
    let v1 = s.put_candidate("{\"a\":1}", None).await.expect("put");
    assert_eq!(v1, 1);
    let v2 = s.put_candidate("{\"a\":2}", Some(1)).await.expect("put");
    assert_eq!(v2, 2);
    assert!(matches!(
        s.put_candidate("{\"a\":3}", Some(1)).await,
        Err(StoreError::Conflict {
            expected: 1,
            actual: 2
        })
    ));
    assert_eq!(
        s.candidate().await.expect("c"),
        Some(("{\"a\":2}".into(), 2))
    );

    let r1 = s
        .add_revision("{}", None, "file:x", "import", "t1")
        .await
        .expect("rev");
    let r2 = s
        .add_revision("{\"p\":1}", Some(r1), "op", "", "t2")
        .await
        .expect("rev");
    assert!(r2 > r1);
    assert_eq!(s.revision(r2).await.expect("r").parent, Some(r1));
    assert!(matches!(
        s.revision(9999).await,
        Err(StoreError::NoRevision(9999))
    ));
    let list = s.revisions(10).await.expect("list");
    assert_eq!(
        list.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![r2, r1],
        "newest first"
    );

    assert_eq!(s.last_commit().await.expect("none"), None);
    let c = Commit {
        id: 0,
        revision: r1,
        previous: None,
        actor: "a".into(),
        at: "t".into(),
        confirm_by: None,
        confirmed: true,
    };
    let c1 = s.add_commit(&c).await.expect("commit");
    let c2 = s
        .add_commit(&Commit {
            revision: r2,
            previous: Some(r1),
            confirm_by: Some("t9".into()),
            confirmed: false,
            ..c.clone()
        })
        .await
        .expect("commit");
    let last = s.last_commit().await.expect("last").expect("some");
    assert_eq!((last.id, last.revision, last.confirmed), (c2, r2, false));
    s.confirm(c2).await.expect("confirm");
    assert!(
        s.last_commit()
            .await
            .expect("last")
            .expect("some")
            .confirmed
    );
    s.delete_commit(c2).await.expect("delete");
    assert_eq!(s.last_commit().await.expect("last").map(|c| c.id), Some(c1));

    assert_eq!(s.token_count().await.expect("n"), 0);
    s.add_token("h1", "ci", Role::Viewer, "t")
        .await
        .expect("token");
    assert_eq!(
        s.token_role("h1").await.expect("role"),
        Some(("ci".into(), Role::Viewer))
    );
    assert_eq!(s.token_role("nope").await.expect("role"), None);
    assert!(
        s.add_token("h1", "dup", Role::Admin, "t").await.is_err(),
        "hashes are unique"
    );

    for i in 0..3 {
        s.add_event(&Event {
            id: 0,
            at: format!("t{i}"),
            actor: "op".into(),
            action: "commit".into(),
            summary: format!("s{i}"),
            result: "ok".into(),
        })
        .await
        .expect("event");
    }
    let ev = s.events(2).await.expect("events");
    assert_eq!(
        ev.iter().map(|e| e.summary.as_str()).collect::<Vec<_>>(),
        ["s2", "s1"]
    );
}

#[tokio::test]
async fn sqlite_store_behaves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = SqliteStore::open(&dir.path().join("admin.db"))
        .await
        .expect("open");
    exercise(&s).await;
}

#[path = "../../testkit/postgres.rs"]
mod postgres;
use postgres::Postgres;

#[tokio::test]
async fn postgres_store_behaves_the_same() {
    let Some(pg) = Postgres::start() else {
        eprintln!("skipped: needs root and Debian's postgresql (scripts/test.sh installs it)");
        return;
    };
    let mut store = None;
    for _ in 0..100 {
        match PgStore::connect(&pg.url()).await {
            Ok(s) => {
                store = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let s = store.expect("PostgreSQL came up");
    exercise(&s).await;
}
