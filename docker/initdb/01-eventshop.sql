-- Runs once, when the postgres container initialises an empty data
-- directory, in database $POSTGRES_DB (eventshop).  CASCADE also creates any
-- extension eventshop requires (e.g. pgcrypto, pg_cron) that is not there yet.
CREATE EXTENSION IF NOT EXISTS eventshop CASCADE;
