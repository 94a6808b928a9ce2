from flink_job.job import main

main()
