-- The queue schema exactly as previewd 0.1's metadata.create_all made it on SQLite (captured DDL).
CREATE TABLE jobs (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
	"key" VARCHAR(64) NOT NULL,
	state VARCHAR(16) NOT NULL,
	priority INTEGER NOT NULL,
	model VARCHAR(64) NOT NULL,
	affinity VARCHAR(128),
	"group" VARCHAR(1024) NOT NULL,
	payload JSON NOT NULL,
	attempts INTEGER NOT NULL,
	max_attempts INTEGER NOT NULL,
	worker_id VARCHAR(128),
	lease_expires_at DATETIME,
	run_after DATETIME,
	progress FLOAT,
	last_error TEXT,
	result JSON,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	started_at DATETIME,
	finished_at DATETIME,
	UNIQUE ("key"),
	CONSTRAINT ck_jobs_state CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled'))
);

CREATE INDEX ix_jobs_group ON jobs ("group", id);

CREATE INDEX ix_jobs_claim ON jobs (state, priority, id);

CREATE TABLE job_events (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
	job_id INTEGER NOT NULL,
	at DATETIME NOT NULL,
	from_state VARCHAR(16),
	to_state VARCHAR(16) NOT NULL,
	worker_id VARCHAR(128),
	message TEXT,
	FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE,
	CONSTRAINT ck_job_events_from_state CHECK (from_state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
	CONSTRAINT ck_job_events_to_state CHECK (to_state IN ('queued', 'running', 'done', 'failed', 'cancelled'))
);

CREATE INDEX ix_job_events_job_id ON job_events (job_id);

CREATE TABLE workers (
	id VARCHAR(128) NOT NULL,
	hostname VARCHAR(255) NOT NULL,
	pid INTEGER NOT NULL,
	started_at DATETIME NOT NULL,
	last_heartbeat DATETIME NOT NULL,
	current_job_id INTEGER,
	PRIMARY KEY (id),
	FOREIGN KEY(current_job_id) REFERENCES jobs (id) ON DELETE SET NULL
);
