-- The control plane's store on PostgreSQL (fleets): the same tables as the
-- SQLite store.
CREATE TABLE revisions (
    id          BIGSERIAL PRIMARY KEY,
    document    TEXT      NOT NULL,
    parent      BIGINT,
    actor       TEXT      NOT NULL,
    comment     TEXT      NOT NULL DEFAULT '',
    created_at  TEXT      NOT NULL
);
CREATE TABLE commits (
    id          BIGSERIAL PRIMARY KEY,
    revision    BIGINT    NOT NULL REFERENCES revisions(id),
    previous    BIGINT,
    actor       TEXT      NOT NULL,
    at          TEXT      NOT NULL,
    confirm_by  TEXT,
    confirmed   BOOLEAN   NOT NULL DEFAULT TRUE
);
CREATE TABLE candidate (
    id          INTEGER   PRIMARY KEY CHECK (id = 1),
    document    TEXT      NOT NULL,
    version     BIGINT    NOT NULL
);
CREATE TABLE tokens (
    hash        TEXT      PRIMARY KEY,
    name        TEXT      NOT NULL,
    role        TEXT      NOT NULL,
    created_at  TEXT      NOT NULL
);
CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    at          TEXT      NOT NULL,
    actor       TEXT      NOT NULL,
    action      TEXT      NOT NULL,
    summary     TEXT      NOT NULL,
    result      TEXT      NOT NULL
);
