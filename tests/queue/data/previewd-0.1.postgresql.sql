-- The queue schema exactly as previewd 0.1's metadata.create_all made it on PostgreSQL (captured DDL).
CREATE TABLE jobs (
	id SERIAL NOT NULL,
	key VARCHAR(64) NOT NULL,
	state VARCHAR(16) NOT NULL,
	priority INTEGER NOT NULL,
	model VARCHAR(64) NOT NULL,
	affinity VARCHAR(128),
	"group" VARCHAR(1024) NOT NULL,
	payload JSON NOT NULL,
	attempts INTEGER NOT NULL,
	max_attempts INTEGER NOT NULL,
	worker_id VARCHAR(128),
	lease_expires_at TIMESTAMP WITH TIME ZONE,
	run_after TIMESTAMP WITH TIME ZONE,
	progress FLOAT,
	last_error TEXT,
	result JSON,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	started_at TIMESTAMP WITH TIME ZONE,
	finished_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (id),
	UNIQUE (key),
	CONSTRAINT ck_jobs_state CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled'))
);

CREATE INDEX ix_jobs_group ON jobs ("group", id);

CREATE INDEX ix_jobs_claim ON jobs (state, priority, id);

COMMENT ON COLUMN jobs.key IS 'idempotency key: one job per render, whatever its state';

COMMENT ON COLUMN jobs.model IS 'claims prefer the model a worker has loaded';

COMMENT ON COLUMN jobs.affinity IS 'e.g. LoRA content hash, so consecutive jobs reuse a loaded LoRA';

COMMENT ON COLUMN jobs."group" IS 'e.g. output folder';

COMMENT ON COLUMN jobs.run_after IS 'retry backoff';

CREATE TABLE job_events (
	id SERIAL NOT NULL,
	job_id INTEGER NOT NULL,
	at TIMESTAMP WITH TIME ZONE NOT NULL,
	from_state VARCHAR(16),
	to_state VARCHAR(16) NOT NULL,
	worker_id VARCHAR(128),
	message TEXT,
	PRIMARY KEY (id),
	FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE,
	CONSTRAINT ck_job_events_from_state CHECK (from_state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
	CONSTRAINT ck_job_events_to_state CHECK (to_state IN ('queued', 'running', 'done', 'failed', 'cancelled'))
);

CREATE INDEX ix_job_events_job_id ON job_events (job_id);

COMMENT ON COLUMN job_events.from_state IS 'NULL for the enqueue event';

CREATE TABLE workers (
	id VARCHAR(128) NOT NULL,
	hostname VARCHAR(255) NOT NULL,
	pid INTEGER NOT NULL,
	started_at TIMESTAMP WITH TIME ZONE NOT NULL,
	last_heartbeat TIMESTAMP WITH TIME ZONE NOT NULL,
	current_job_id INTEGER,
	PRIMARY KEY (id),
	FOREIGN KEY(current_job_id) REFERENCES jobs (id) ON DELETE SET NULL
);
