-- The audit query store in PostgreSQL (DESIGN §10): one table, one column
-- per §6 field (same names; `timestamp` with time zone) plus kind, seq,
-- shadow_decision, shadow_policy_id (and reason, actor, detail). Grafana's
-- dashboards query it by these names. Applied by the sink on start.
CREATE TABLE IF NOT EXISTS audit_records (
    seq               BIGINT      PRIMARY KEY,
    kind              TEXT        NOT NULL,
    "timestamp"       TIMESTAMPTZ NOT NULL,
    request_id        TEXT        NOT NULL,
    agent_id          TEXT        NOT NULL,
    team_id           TEXT        NOT NULL,
    project_id        TEXT        NOT NULL,
    environment       TEXT        NOT NULL,
    destination_host  TEXT        NOT NULL,
    destination_port  INTEGER     NOT NULL,
    http_method       TEXT        NOT NULL,
    path              TEXT        NOT NULL,
    decision          TEXT        NOT NULL,
    reason            TEXT        NOT NULL,
    policy_id         TEXT        NOT NULL,
    bundle_revision   TEXT        NOT NULL,
    quota_applied     TEXT        NOT NULL,
    response_code     INTEGER     NOT NULL,
    latency_ms        BIGINT      NOT NULL,
    bytes_out         BIGINT      NOT NULL,
    bytes_in          BIGINT      NOT NULL,
    source_address    TEXT        NOT NULL,
    shadow_decision   TEXT        NOT NULL,
    shadow_policy_id  TEXT        NOT NULL,
    actor             TEXT        NOT NULL,
    detail            TEXT        NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_time     ON audit_records ("timestamp");
CREATE INDEX IF NOT EXISTS audit_records_agent    ON audit_records (agent_id, "timestamp");
CREATE INDEX IF NOT EXISTS audit_records_team     ON audit_records (team_id, "timestamp");
CREATE INDEX IF NOT EXISTS audit_records_decision ON audit_records (decision, "timestamp");
CREATE INDEX IF NOT EXISTS audit_records_host     ON audit_records (destination_host, "timestamp");
CREATE INDEX IF NOT EXISTS audit_records_policy   ON audit_records (policy_id, "timestamp");
CREATE INDEX IF NOT EXISTS audit_records_kind     ON audit_records (kind, seq);
