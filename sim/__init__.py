"""visabus.sim"""
