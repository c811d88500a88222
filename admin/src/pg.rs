//! The control plane's store on PostgreSQL (fleets): the same behaviour as
//! [`crate::SqliteStore`], proven by one test body run against both.

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::Row;

use crate::store::{Commit, Event, Revision, Store, StoreError};
use crate::Role;

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connect to `url` (`postgres://user@host:port/db`) and migrate.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool })
    }
}

fn revision_row(r: &PgRow) -> Revision {
    Revision {
        id: r.get("id"),
        document: r.get("document"),
        parent: r.get("parent"),
        actor: r.get("actor"),
        comment: r.get("comment"),
        created_at: r.get("created_at"),
    }
}

#[async_trait]
impl Store for PgStore {
    async fn candidate(&self) -> Result<Option<(String, i64)>, StoreError> {
        let row = sqlx::query("SELECT document, version FROM candidate WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("document"), r.get("version"))))
    }

    async fn put_candidate(&self, doc: &str, expected: Option<i64>) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let actual: i64 = sqlx::query("SELECT version FROM candidate WHERE id = 1 FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.get("version"))
            .unwrap_or(0);
        if let Some(expected) = expected {
            if expected != actual {
                return Err(StoreError::Conflict { expected, actual });
            }
        }
        let next = actual + 1;
        sqlx::query(
            "INSERT INTO candidate (id, document, version) VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET document = $1, version = $2",
        )
        .bind(doc)
        .bind(next)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(next)
    }

    async fn add_revision(
        &self,
        doc: &str,
        parent: Option<i64>,
        actor: &str,
        comment: &str,
        at: &str,
    ) -> Result<i64, StoreError> {
        let r = sqlx::query(
            "INSERT INTO revisions (document, parent, actor, comment, created_at)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(doc)
        .bind(parent)
        .bind(actor)
        .bind(comment)
        .bind(at)
        .fetch_one(&self.pool)
        .await?;
        Ok(r.get("id"))
    }

    async fn revision(&self, id: i64) -> Result<Revision, StoreError> {
        sqlx::query("SELECT * FROM revisions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| revision_row(&r))
            .ok_or(StoreError::NoRevision(id))
    }

    async fn revisions(&self, limit: i64) -> Result<Vec<Revision>, StoreError> {
        let rows = sqlx::query("SELECT * FROM revisions ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(revision_row).collect())
    }

    async fn last_revision_by(&self, actor: &str) -> Result<Option<Revision>, StoreError> {
        Ok(
            sqlx::query("SELECT * FROM revisions WHERE actor = $1 ORDER BY id DESC LIMIT 1")
                .bind(actor)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| revision_row(&r)),
        )
    }

    async fn add_commit(&self, c: &Commit) -> Result<i64, StoreError> {
        let r = sqlx::query(
            "INSERT INTO commits (revision, previous, actor, at, confirm_by, confirmed)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(c.revision)
        .bind(c.previous)
        .bind(&c.actor)
        .bind(&c.at)
        .bind(&c.confirm_by)
        .bind(c.confirmed)
        .fetch_one(&self.pool)
        .await?;
        Ok(r.get("id"))
    }

    async fn last_commit(&self) -> Result<Option<Commit>, StoreError> {
        Ok(self.commits(1).await?.into_iter().next())
    }

    async fn commits(&self, limit: i64) -> Result<Vec<Commit>, StoreError> {
        let rows = sqlx::query("SELECT * FROM commits ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Commit {
                id: r.get("id"),
                revision: r.get("revision"),
                previous: r.get("previous"),
                actor: r.get("actor"),
                at: r.get("at"),
                confirm_by: r.get("confirm_by"),
                confirmed: r.get("confirmed"),
            })
            .collect())
    }

    async fn confirm(&self, commit: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE commits SET confirmed = TRUE WHERE id = $1")
            .bind(commit)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_commit(&self, commit: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM commits WHERE id = $1")
            .bind(commit)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn add_token(
        &self,
        hash: &str,
        name: &str,
        role: Role,
        at: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tokens (hash, name, role, created_at) VALUES ($1, $2, $3, $4)")
            .bind(hash)
            .bind(name)
            .bind(role.as_str())
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn token_role(&self, hash: &str) -> Result<Option<(String, Role)>, StoreError> {
        let row = sqlx::query("SELECT name, role FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| {
            let role: String = r.get("role");
            Role::parse(&role).map(|role| (r.get("name"), role))
        }))
    }

    async fn token_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM tokens")
            .fetch_one(&self.pool)
            .await?
            .get("n"))
    }

    async fn add_event(&self, e: &Event) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO events (at, actor, action, summary, result) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&e.at)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.summary)
        .bind(&e.result)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn events(&self, limit: i64) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query("SELECT * FROM events ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Event {
                id: r.get("id"),
                at: r.get("at"),
                actor: r.get("actor"),
                action: r.get("action"),
                summary: r.get("summary"),
                result: r.get("result"),
            })
            .collect())
    }
}
