from flink_job.flink.job import main

main()
