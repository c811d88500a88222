//! The control plane's store, behind one trait: revisions, commits, the
//! candidate document, admin tokens (hashed) and the admin event record.
//! SQLite (a file in `state_dir`) is the one-host default.

use std::path::Path;

use async_trait::async_trait;
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

use crate::Role;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the candidate changed since version {expected} (now {actual}); reload it and retry")]
    Conflict { expected: i64, actual: i64 },
    #[error("no revision {0}")]
    NoRevision(i64),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Revision {
    pub id: i64,
    /// Canonical JSON of the policy document.
    #[serde(skip)]
    pub document: String,
    pub parent: Option<i64>,
    pub actor: String,
    pub comment: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Commit {
    pub id: i64,
    pub revision: i64,
    pub previous: Option<i64>,
    pub actor: String,
    pub at: String,
    /// `commit confirmed`: the time by which `confirm` must come.
    pub confirm_by: Option<String>,
    pub confirmed: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub summary: String,
    pub result: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The candidate document (JSON) and its version; `None` before the
    /// first one is written.
    async fn candidate(&self) -> Result<Option<(String, i64)>, StoreError>;
    /// Replace the candidate if its version is still `expected` (`None`:
    /// unconditionally). Returns the new version.
    async fn put_candidate(&self, doc: &str, expected: Option<i64>) -> Result<i64, StoreError>;
    async fn add_revision(
        &self,
        doc: &str,
        parent: Option<i64>,
        actor: &str,
        comment: &str,
        at: &str,
    ) -> Result<i64, StoreError>;
    async fn revision(&self, id: i64) -> Result<Revision, StoreError>;
    async fn revisions(&self, limit: i64) -> Result<Vec<Revision>, StoreError>;
    /// The newest revision made by `actor` (e.g. `file:FILE`), however old.
    async fn last_revision_by(&self, actor: &str) -> Result<Option<Revision>, StoreError>;
    async fn add_commit(&self, c: &Commit) -> Result<i64, StoreError>;
    /// The newest commit: it names the active revision.
    async fn last_commit(&self) -> Result<Option<Commit>, StoreError>;
    /// Commits, newest first.
    async fn commits(&self, limit: i64) -> Result<Vec<Commit>, StoreError>;
    async fn confirm(&self, commit: i64) -> Result<(), StoreError>;
    /// Undo a commit row whose bundle could not be published.
    async fn delete_commit(&self, commit: i64) -> Result<(), StoreError>;
    async fn add_token(
        &self,
        hash: &str,
        name: &str,
        role: Role,
        at: &str,
    ) -> Result<(), StoreError>;
    async fn token_role(&self, hash: &str) -> Result<Option<(String, Role)>, StoreError>;
    async fn token_count(&self) -> Result<i64, StoreError>;
    async fn add_event(&self, e: &Event) -> Result<(), StoreError>;
    async fn events(&self, limit: i64) -> Result<Vec<Event>, StoreError>;
}

/// SQLite, in WAL mode, migrated on open.
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

fn revision_row(r: &sqlx::sqlite::SqliteRow) -> Revision {
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
impl Store for SqliteStore {
    async fn candidate(&self) -> Result<Option<(String, i64)>, StoreError> {
        let row = sqlx::query("SELECT document, version FROM candidate WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("document"), r.get("version"))))
    }

    async fn put_candidate(&self, doc: &str, expected: Option<i64>) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let actual: i64 = sqlx::query("SELECT version FROM candidate WHERE id = 1")
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
            "INSERT INTO candidate (id, document, version) VALUES (1, ?1, ?2)
             ON CONFLICT(id) DO UPDATE SET document = ?1, version = ?2",
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
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(doc)
        .bind(parent)
        .bind(actor)
        .bind(comment)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(r.last_insert_rowid())
    }

    async fn revision(&self, id: i64) -> Result<Revision, StoreError> {
        sqlx::query("SELECT * FROM revisions WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| revision_row(&r))
            .ok_or(StoreError::NoRevision(id))
    }

    async fn revisions(&self, limit: i64) -> Result<Vec<Revision>, StoreError> {
        let rows = sqlx::query("SELECT * FROM revisions ORDER BY id DESC LIMIT ?1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(revision_row).collect())
    }

    async fn last_revision_by(&self, actor: &str) -> Result<Option<Revision>, StoreError> {
        Ok(
            sqlx::query("SELECT * FROM revisions WHERE actor = ?1 ORDER BY id DESC LIMIT 1")
                .bind(actor)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| revision_row(&r)),
        )
    }

    async fn add_commit(&self, c: &Commit) -> Result<i64, StoreError> {
        let r = sqlx::query(
            "INSERT INTO commits (revision, previous, actor, at, confirm_by, confirmed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(c.revision)
        .bind(c.previous)
        .bind(&c.actor)
        .bind(&c.at)
        .bind(&c.confirm_by)
        .bind(c.confirmed)
        .execute(&self.pool)
        .await?;
        Ok(r.last_insert_rowid())
    }

    async fn last_commit(&self) -> Result<Option<Commit>, StoreError> {
        Ok(self.commits(1).await?.into_iter().next())
    }

    async fn commits(&self, limit: i64) -> Result<Vec<Commit>, StoreError> {
        let rows = sqlx::query("SELECT * FROM commits ORDER BY id DESC LIMIT ?1")
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
        sqlx::query("UPDATE commits SET confirmed = 1 WHERE id = ?1")
            .bind(commit)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_commit(&self, commit: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM commits WHERE id = ?1")
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
        sqlx::query("INSERT INTO tokens (hash, name, role, created_at) VALUES (?1, ?2, ?3, ?4)")
            .bind(hash)
            .bind(name)
            .bind(role.as_str())
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn token_role(&self, hash: &str) -> Result<Option<(String, Role)>, StoreError> {
        let row = sqlx::query("SELECT name, role FROM tokens WHERE hash = ?1")
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
            "INSERT INTO events (at, actor, action, summary, result) VALUES (?1, ?2, ?3, ?4, ?5)",
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
        let rows = sqlx::query("SELECT * FROM events ORDER BY id DESC LIMIT ?1")
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
