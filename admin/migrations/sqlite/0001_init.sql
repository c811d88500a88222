-- The control plane's store: revisions of the policy document, commits
-- (which revision is active), the candidate being edited, admin tokens
-- (hashed), and the record of every admin action.
CREATE TABLE revisions (
    id          INTEGER PRIMARY KEY,
    document    TEXT    NOT NULL,
    parent      INTEGER,
    actor       TEXT    NOT NULL,
    comment     TEXT    NOT NULL DEFAULT '',
    created_at  TEXT    NOT NULL
);
CREATE TABLE commits (
    id          INTEGER PRIMARY KEY,
    revision    INTEGER NOT NULL REFERENCES revisions(id),
    previous    INTEGER,
    actor       TEXT    NOT NULL,
    at          TEXT    NOT NULL,
    confirm_by  TEXT,
    confirmed   INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE candidate (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    document    TEXT    NOT NULL,
    version     INTEGER NOT NULL
);
CREATE TABLE tokens (
    hash        TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    created_at  TEXT    NOT NULL
);
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    at          TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    summary     TEXT    NOT NULL,
    result      TEXT    NOT NULL
);
