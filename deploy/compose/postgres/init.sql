-- PostgreSQL for a Clawgress fleet, run once by the postgres image on an
-- empty data directory (/docker-entrypoint-initdb.d), as the superuser
-- POSTGRES_USER (clawgress), in POSTGRES_DB (clawgress: the control plane).
-- Also the `clawgress-postgres-init` ConfigMap of deploy/k8s.
--
-- clawgress_audit: the audit query store. The audit sink (role clawgress)
-- creates its table audit_records on start (audit-sink/sql/postgres.sql).
-- grafana: a role that can only read it, for the traffic dashboard. Its
-- password comes from the environment (GRAFANA_DB_PASSWORD).
\getenv grafana_password GRAFANA_DB_PASSWORD
\if :{?grafana_password}
\else
  -- Stop here (psql runs with ON_ERROR_STOP): no role without a password.
  DO $$ BEGIN RAISE EXCEPTION 'GRAFANA_DB_PASSWORD is not set'; END $$;
\endif

CREATE DATABASE clawgress_audit OWNER clawgress;
CREATE ROLE grafana LOGIN PASSWORD :'grafana_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
-- Statements Grafana runs may not hold the store for long.
ALTER ROLE grafana SET statement_timeout = '30s';

\connect clawgress_audit
REVOKE ALL ON DATABASE clawgress_audit FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT ON DATABASE clawgress_audit TO grafana;
GRANT USAGE ON SCHEMA public TO grafana;
-- Tables the sink creates later are readable by grafana, and nothing more.
ALTER DEFAULT PRIVILEGES FOR ROLE clawgress IN SCHEMA public GRANT SELECT ON TABLES TO grafana;
